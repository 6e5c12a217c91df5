//! Reading records back and checking them: ids, order per aggregate, duplicates.

use super::*;

/// After writers that may not know every commit's outcome: waits for the
/// outbox to drain, then reads `topic` until it holds as many distinct ids
/// as events were committed (the sum of the aggregates' versions) and every
/// id known to be committed. Returns the records and that count.
pub async fn consume_everything_committed(
    pool: &PgPool,
    brokers: &str,
    topic: &str,
    written: &Written,
    deadline: Duration,
) -> (Vec<Consumed>, i64) {
    wait_for("the outbox to drain", deadline, || async {
        sqlx::query_scalar::<_, i64>("select count(*) from outbox")
            .fetch_one(pool)
            .await
            .is_ok_and(|n| n == 0)
    })
    .await;
    let expected: i64 = sqlx::query_scalar("select coalesce(sum(version), 0)::bigint from agg")
        .fetch_one(pool)
        .await
        .unwrap();
    let committed: HashSet<Uuid> = written.committed.iter().copied().collect();
    let records = consume_until(brokers, &[topic], deadline, |r| {
        let seen: HashSet<Uuid> = r.iter().map(Consumed::id).collect();
        seen.len() as i64 >= expected && committed.is_subset(&seen)
    })
    .await;
    (records, expected)
}

/// Every aggregate's delivered versions reach the version its row holds:
/// with [`assert_order`] (1, 2, 3, ... in order) nothing committed is
/// missing, even for transactions whose commit outcome the writer never
/// learned.
pub async fn assert_versions_match(pool: &PgPool, records: &[Consumed]) {
    let mut delivered: HashMap<String, i64> = HashMap::new();
    for r in records {
        let v = delivered.entry(r.key.clone().unwrap()).or_default();
        *v = (*v).max(r.version());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as("select id, version from agg where version > 0")
        .fetch_all(pool)
        .await
        .unwrap();
    for (id, version) in rows {
        assert_eq!(
            delivered.get(&id).copied().unwrap_or(0),
            version,
            "aggregate {id}: committed up to version {version}, delivered up to another"
        );
    }
}

/// Reads `topic` from the beginning, handing each record's key, value and
/// headers to `each` without keeping it, until `each` returns true or
/// `deadline` passes. Returns whether `each` said it was done.
pub fn consume_each(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    mut each: impl FnMut(i32, Option<&[u8]>, Option<&[u8]>) -> bool,
) -> bool {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..metadata.topics()[0].partitions().len() as i32 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if each(m.partition(), m.key(), m.payload()) => return true,
            Some(Ok(_)) => {}
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    false
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Consumed {
    pub fn id(&self) -> Uuid {
        let (_, value) = self
            .headers
            .iter()
            .find(|(k, _)| k == "id")
            .expect("record has an id header");
        Uuid::parse_str(std::str::from_utf8(value).unwrap()).unwrap()
    }

    pub fn version(&self) -> i64 {
        let value: serde_json::Value =
            serde_json::from_slice(self.value.as_deref().unwrap()).unwrap();
        value["version"].as_i64().unwrap()
    }
}

/// Reads `topics` from the beginning until `done` holds for what was read,
/// or `deadline` passes (then returns what it has).
pub async fn consume_until(
    brokers: &str,
    topics: &[&str],
    deadline: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let partitions = metadata.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&assignment).unwrap();
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    tokio::task::block_in_place(|| {
        while !done(&out) && Instant::now() < until {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
    });
    out
}

/// Reads until every id in `expected` was seen.
pub async fn consume_ids(
    brokers: &str,
    topics: &[&str],
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let expected: HashSet<Uuid> = expected.iter().copied().collect();
    consume_until(brokers, topics, deadline, |records| {
        let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
        expected.is_subset(&seen)
    })
    .await
}

/// Reads until every id in `expected` was seen, then waits for the outbox
/// to drain (every published row confirmed); returns what was read.
pub async fn consume_and_drain(
    pool: &PgPool,
    brokers: &str,
    topics: &[&str],
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let records = consume_ids(brokers, topics, expected, deadline).await;
    wait_for("the outbox to drain", deadline, || async {
        outbox_count(pool).await == 0
    })
    .await;
    records
}

/// Per-aggregate order: every aggregate lives in one partition, and its
/// first deliveries carry versions 1, 2, 3, ... in offset order. Returns the
/// number of duplicate deliveries.
pub fn assert_order(records: &[Consumed]) -> usize {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    let mut duplicates = 0;
    for (key, mut list) in by_key {
        let partitions: HashSet<(String, i32)> = list
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        assert_eq!(
            partitions.len(),
            1,
            "aggregate {key} is spread over {partitions:?}"
        );
        list.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let mut expected = 1;
        for r in list {
            if !seen.insert(r.id()) {
                duplicates += 1;
                continue;
            }
            assert_eq!(
                r.version(),
                expected,
                "aggregate {key}: version {} arrived where {expected} was due",
                r.version()
            );
            expected += 1;
        }
    }
    duplicates
}

/// Every committed id was delivered and no rolled-back one was.
pub fn assert_delivered(records: &[Consumed], written: &Written) {
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    let missing = written
        .committed
        .iter()
        .filter(|id| !seen.contains(id))
        .count();
    assert_eq!(missing, 0, "{missing} committed rows never reached Kafka");
    let leaked = written
        .rolled_back
        .iter()
        .filter(|id| seen.contains(id))
        .count();
    assert_eq!(
        leaked, 0,
        "{leaked} rows of rolled-back transactions were published"
    );
}

/// With `--retention` (rows stay): waits until every committed row is known
/// to be published, then reads `topics` until every id in `expected` and as
/// many distinct ids of the first topic as events were committed (the
/// aggregates' versions) arrived.
pub async fn consume_all_retained(
    pool: &PgPool,
    brokers: &str,
    topics: &[&str],
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    wait_for("every row to be known published", deadline, || async {
        not_known_published(pool).await == 0
    })
    .await;
    let committed: i64 = sqlx::query_scalar("select coalesce(sum(version), 0)::bigint from agg")
        .fetch_one(pool)
        .await
        .unwrap();
    let expected: HashSet<Uuid> = expected.iter().copied().collect();
    consume_until(brokers, topics, deadline, |records| {
        let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
        expected.is_subset(&seen)
            && records
                .iter()
                .filter(|r| r.topic == topics[0])
                .map(Consumed::id)
                .collect::<HashSet<_>>()
                .len() as i64
                >= committed
    })
    .await
}
