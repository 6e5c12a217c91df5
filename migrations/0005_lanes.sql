-- Lanes (`run --shards N`). Every row falls in one of 1024 virtual buckets,
-- a stable hash of its aggregate id (the hash Postgres' own hash
-- partitioning uses), so all rows of an aggregate share a bucket and keep
-- their order within it. Shard k of N is a contiguous range of buckets:
-- N can change without rewriting a row. A lane reads the `seq` index and
-- skips the other lanes' rows, oldest first as unsharded; no index of its
-- own, so writers pay nothing more per row than computing the hash.
alter table outbox add column bucket smallint not null
    generated always as ((hashtextextended(aggregate_id, 0) & 1023)::smallint) stored;

-- The layout a lease belongs to: the outbox (schema) and its --shards. An
-- instance whose --shards differs from a live holder's is refused.
alter table relay_lease add column outbox text;
alter table relay_lease add column shards integer not null default 1;
update relay_lease set outbox = substr(name, length('outbox-relay:') + 1)
    where name like 'outbox-relay:%';
