-- Tail mode's progress beside each replication slot, for `run --mode tail
-- --retention`, which keeps published rows instead of deleting them.
--
-- bucket_from, bucket_to: the buckets the slot's lane reads (0 to 1024 for
-- a whole outbox), so that what a slot says is published applies to the
-- rows of its lane only.
--
-- resume_lsn, resume_rows: the last confirmed row, as the commit position
-- of its transaction and its place in that transaction. After a restart
-- the stream comes again from the slot's confirmed position, which may be
-- before it; rows up to this point are skipped, not published twice.
--
-- copy_snapshot, copy_through: how far a slot's first copy got (rows up
-- to copy_through that copy_snapshot sees are published), so that a copy
-- killed part way and started again with a new slot does not publish those
-- rows again. Cleared when a copy finishes.
--
-- published_before: every transaction with a smaller id is published.
-- Relays emit a logical decoding message carrying the oldest transaction
-- still running (pg_snapshot_xmin); once the stream confirmed every row
-- before that message, every older transaction is published. Bulk removal
-- of retained rows and the recovery of a lost or invalidated slot both go
-- by it, so neither can lose a row that was not published.
alter table relay_slot add column outbox text;
alter table relay_slot add column bucket_from smallint;
alter table relay_slot add column bucket_to smallint;
alter table relay_slot add column resume_lsn pg_lsn;
alter table relay_slot add column resume_rows bigint;
alter table relay_slot add column copy_snapshot pg_snapshot;
alter table relay_slot add column copy_through bigint;
alter table relay_slot add column published_before xid8;
alter table relay_slot add column published_before_at timestamptz;
