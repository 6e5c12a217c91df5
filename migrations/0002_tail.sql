-- Tail mode's memory of the replication slots it created. A slot is usable
-- only once the rows already in the outbox when it was created (the rows its
-- snapshot saw) have been published: until `copied_at` is set, a restart
-- drops the slot and starts over with a new one, so a crash during that
-- first copy loses nothing.
create table relay_slot (
    slot_name text primary key,
    created_at timestamptz not null default now(),
    copied_at timestamptz
);
