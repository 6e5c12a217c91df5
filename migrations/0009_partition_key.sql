-- An optional partition key per row: the record key (Kafka) and routing key
-- (RabbitMQ) when set, instead of aggregate_id. Null: aggregate_id, as
-- before. The relay's own order and lanes stay per aggregate (README,
-- "Partition key").
alter table outbox add column partition_key text;
alter table dead_letter add column partition_key text;
