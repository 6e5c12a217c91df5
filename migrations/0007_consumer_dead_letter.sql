-- The consumer runtime's dead letters: messages a consumer group could not
-- apply (a permanent handler error, too many attempts, or no usable `id`),
-- moved aside in their own transaction so that the partition moves on.
--
-- topic, partition, offset: where the broker had the message (partition is
-- -1 and offset the delivery's sequence where the broker has neither).
-- message_id: the `id` header, when the message had a valid one; one row per
-- (consumer_group, message_id), so redelivered copies add no rows.
-- headers: a JSON array of {"key": ..., "value": ...} in delivery order;
-- a value that is not UTF-8 is {"key": ..., "hex": ...}, a null one has neither.
-- retry_requested_at: set by `outbox-relay consumer-dead-letters retry`; a
-- running consumer of the group applies the row through its handler and
-- deletes it.
create table consumer_dead_letter (
    id                 bigint      generated always as identity primary key,
    consumer_group     text        not null,
    topic              text        not null,
    partition          integer     not null,
    "offset"           bigint      not null,
    message_id         uuid,
    key                bytea,
    headers            jsonb       not null default '[]',
    payload            bytea,
    error              text        not null,
    attempts           integer     not null,
    failed_at          timestamptz not null default now(),
    retry_requested_at timestamptz
);

create unique index consumer_dead_letter_message_idx
    on consumer_dead_letter (consumer_group, message_id);

create index consumer_dead_letter_retry_idx
    on consumer_dead_letter (consumer_group, id)
    where retry_requested_at is not null;
