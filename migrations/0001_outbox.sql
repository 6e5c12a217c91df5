-- The outbox: one row per event, written by the service inside its business
-- transaction. `seq` orders rows of one aggregate (see README, "Ordering").
create table outbox (
    seq            bigint generated always as identity,
    id             uuid        not null default gen_random_uuid() primary key,
    aggregate_type text        not null,
    aggregate_id   text        not null,
    event_type     text        not null,
    topic          text,
    payload        jsonb,
    headers        jsonb       not null default '{}',
    created_at     timestamptz not null default now()
);

create unique index outbox_seq_idx on outbox (seq);

-- The inbox: a consumer records (consumer_group, message_id) in the same
-- transaction as its own effects, so a redelivered message is skipped.
create table inbox (
    consumer_group text        not null,
    message_id     uuid        not null,
    processed_at   timestamptz not null default now(),
    primary key (consumer_group, message_id)
);

create index inbox_processed_at_idx on inbox (processed_at);

-- Rows the broker rejected for good, moved out of the outbox with the error.
create table dead_letter (
    seq            bigint      not null,
    id             uuid        not null primary key,
    aggregate_type text        not null,
    aggregate_id   text        not null,
    event_type     text        not null,
    topic          text,
    payload        jsonb,
    headers        jsonb       not null default '{}',
    created_at     timestamptz not null,
    error          text        not null,
    attempts       integer     not null default 1,
    failed_at      timestamptz not null default now()
);
