-- `--on-poison block-aggregate` asks, for every batch, whether an
-- aggregate has a row in the dead-letter table.
create index dead_letter_aggregate_idx on dead_letter (aggregate_type, aggregate_id);
