#!/usr/bin/env python3
"""Checks the records outbox-relay published against the outbox rows they
came from, with a Kafka client that is not the relay's (confluent-kafka).

The README's mapping rule is implemented here a second time:

- topic: the row's `topic`, else the template with `{aggregate_type}` and
  `{event_type}` filled in;
- partition: the Java client's default for keyed records,
  murmur2(key) & 0x7fffffff % partitions;
- key: `partition_key` when set, else `aggregate_id`, as UTF-8;
- value: `payload` exactly as Postgres prints the jsonb, or `null` (the
  default) / no value (`--null-payload tombstone`) for a null payload;
- headers, in this order: `id`, `event_type`, `aggregate_type`, then every
  pair of `headers` by ascending key except those three names; string values
  as UTF-8, other JSON values as compact JSON text.

Every row must arrive, each aggregate's first deliveries must be in `seq`
order, and every record on the topics must belong to a row. Reads every
partition from the beginning up to its high watermark, so run it after the
relay has confirmed the rows. Exits 0 if all holds, 1 listing what does not,
3 if confluent-kafka is missing.

    check_records.py --brokers HOST:PORT --rows rows.json --template 'x.{aggregate_type}'

rows.json is a JSON array of objects with the outbox columns (`seq`, `id`,
`aggregate_type`, `aggregate_id`, `event_type`, `topic`, `partition_key`, `payload` as the
jsonb's text or null, `headers` as an object).
"""

import argparse
import json
import sys
import time
import uuid

try:
    from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING
except ImportError:
    print(
        "check_records.py needs the confluent-kafka package: "
        "python3 -m pip install confluent-kafka (.ci/run installs it)",
        file=sys.stderr,
    )
    sys.exit(3)

RESERVED = ("id", "event_type", "aggregate_type")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), unsigned."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length & ~3
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# Kafka's own test vectors (UtilsTest.testMurmur2), as signed 32-bit ints.
for text, signed in [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]:
    assert murmur2(text.encode()) == signed & 0xFFFFFFFF, f"murmur2({text!r})"


def header_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def expected_record(row, template, null_payload):
    topic = row["topic"] or template.replace(
        "{aggregate_type}", row["aggregate_type"]
    ).replace("{event_type}", row["event_type"])
    if row["payload"] is not None:
        value = row["payload"].encode()
    else:
        value = b"null" if null_payload == "json-null" else None
    headers = [
        ("id", str(uuid.UUID(row["id"])).encode()),
        ("event_type", row["event_type"].encode()),
        ("aggregate_type", row["aggregate_type"].encode()),
    ]
    headers += [
        (name, header_bytes(value))
        for name, value in sorted(row["headers"].items())
        if name not in RESERVED
    ]
    return {
        "topic": topic,
        "key": (row.get("partition_key") or row["aggregate_id"]).encode(),
        "value": value,
        "headers": headers,
    }


def read_all(brokers, topics, timeout):
    """Every record of `topics`: each partition is read from the beginning
    until the consumer reports its end (the high watermark of a fetch
    response). Not through ListOffsets, which tansu 0.6 answers wrongly."""
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"check-records-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    partitions, remaining = {}, set()
    for topic in sorted(topics):
        metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
        if metadata.error is not None:
            raise SystemExit(f"topic {topic}: {metadata.error}")
        partitions[topic] = len(metadata.partitions)
        remaining.update((topic, p) for p in metadata.partitions)
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in remaining])
    records = []
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        error = message.error()
        if error is None:
            records.append(message)
        elif error.code() == KafkaError._PARTITION_EOF:
            remaining.discard((message.topic(), message.partition()))
        else:
            print(f"consumer: {error}", file=sys.stderr)
    consumer.close()
    if remaining:
        raise SystemExit(f"partitions not read to the end within {timeout}s: {sorted(remaining)}")
    return partitions, records


def check(rows, partitions, records, template, null_payload):
    """Returns the list of violations."""
    problems = []
    by_id = {str(uuid.UUID(row["id"])): row for row in rows}
    first_offset = {}
    for m in records:
        where = f"{m.topic()}/{m.partition()}@{m.offset()}"
        headers = [(k, v if v is not None else b"") for k, v in (m.headers() or [])]
        ids = [v for k, v in headers if k == "id"]
        if len(ids) != 1:
            problems.append(f"{where}: {len(ids)} id headers, expected exactly one")
            continue
        record_id = ids[0].decode(errors="replace")
        row = by_id.get(record_id)
        if row is None:
            problems.append(f"{where}: id {record_id} is not an outbox row")
            continue
        want = expected_record(row, template, null_payload)
        if m.topic() != want["topic"]:
            problems.append(f"{record_id}: topic {m.topic()!r}, expected {want['topic']!r}")
        if m.key() != want["key"]:
            problems.append(f"{record_id}: key {m.key()!r}, expected {want['key']!r}")
        if m.value() != want["value"]:
            problems.append(f"{record_id}: value {m.value()!r}, expected {want['value']!r}")
        if headers != want["headers"]:
            problems.append(f"{record_id}: headers {headers!r}, expected {want['headers']!r}")
        count = partitions.get(m.topic())
        if count and m.key() is not None:
            expected_partition = java_partition(m.key(), count)
            if m.partition() != expected_partition:
                problems.append(
                    f"{record_id}: partition {m.partition()}, the Java client's murmur2 "
                    f"puts key {m.key()!r} in {expected_partition} of {count}"
                )
        first_offset.setdefault(record_id, (m.topic(), m.partition(), m.offset()))

    missing = [i for i in by_id if i not in first_offset]
    if missing:
        problems.append(f"{len(missing)} rows never arrived, e.g. {missing[:5]}")

    # Each aggregate's first deliveries in seq order.
    by_key = {}
    for row in sorted(rows, key=lambda r: r["seq"]):
        record_id = str(uuid.UUID(row["id"]))
        if record_id in first_offset:
            by_key.setdefault((row["aggregate_type"], row["aggregate_id"]), []).append(
                (row["seq"], first_offset[record_id])
            )
    for key, seen in by_key.items():
        for (seq_a, at_a), (seq_b, at_b) in zip(seen, seen[1:]):
            if at_a[:2] == at_b[:2] and at_a[2] > at_b[2]:
                problems.append(
                    f"aggregate {key}: seq {seq_b} at offset {at_b[2]} before seq {seq_a} at {at_a[2]}"
                )
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--rows", required=True, help="JSON array of outbox rows")
    parser.add_argument("--template", default="{aggregate_type}.events")
    parser.add_argument("--null-payload", choices=["json-null", "tombstone"], default="json-null")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    with open(args.rows, encoding="utf-8") as f:
        rows = json.load(f)
    topics = {expected_record(row, args.template, args.null_payload)["topic"] for row in rows}
    partitions, records = read_all(args.brokers, topics, args.timeout)
    problems = check(rows, partitions, records, args.template, args.null_payload)
    for problem in problems:
        print(f"MISMATCH {problem}")
    if problems:
        print(f"{len(problems)} problems in {len(records)} records for {len(rows)} rows")
        return 1
    duplicates = len(records) - len(rows)
    print(
        f"ok: {len(rows)} rows, {len(records)} records ({duplicates} duplicates) "
        f"on {len(topics)} topics, read with confluent-kafka"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
