-- Leadership of an outbox (and, later, of each lane of it): the active relay
-- holds the advisory lock named `name` on its leader connection and renews
-- this row from its relay loop. A standby that finds `renewed_at` older than
-- the lease while `backend_pid` still holds the lock fences that session
-- (pg_terminate_backend) and takes over. `epoch` grows with every
-- acquisition; every confirm checks it, so a fenced leader confirms nothing.
create table relay_lease (
    name        text        primary key,
    holder      text        not null,
    epoch       bigint      not null,
    backend_pid integer     not null,
    acquired_at timestamptz not null default now(),
    renewed_at  timestamptz not null default now(),
    -- How many times leadership passed from one instance to another.
    takeovers   bigint      not null default 0
);
