-- The consumer runtime on NATS JetStream: one member of a consumer group
-- receives a stream's messages at a time (so that one aggregate's messages
-- are applied in order), and this row says which.
--
-- holder: the member process (random per start); epoch: grows by one with
-- every takeover and names the JetStream consumer the holder reads through
-- (GROUP-EPOCH), so a member that lost the row reads nothing more.
-- renewed_at: the database's clock at the holder's last renewal; another
-- member takes over once it is older than the lease (the member's setting).
create table consumer_member (
    consumer_group text        not null,
    source         text        not null,
    holder         text        not null,
    epoch          bigint      not null,
    renewed_at     timestamptz not null,
    primary key (consumer_group, source)
);
