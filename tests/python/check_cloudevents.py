#!/usr/bin/env python3
"""Reads CloudEvents back with clients that are not the relay's: Python's
confluent-kafka or pika, and the CloudEvents Python SDK's own protocol
bindings (cloudevents.core.bindings.kafka / rabbitmq), which detect the
content mode (binary or structured) and parse the event.

Prints one JSON object per message on stdout:
  {"key": ..., "id_header": ..., "attributes": {...}, "data": ...}
with `time` as RFC 3339 text. Exit 3: a library is missing.
"""

import argparse
import json
import sys
import time

try:
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
    from cloudevents.core.formats.json import JSONFormat
except ImportError as e:  # pragma: no cover
    print(f"the CloudEvents Python SDK is missing ({e}); pip install cloudevents", file=sys.stderr)
    sys.exit(3)


def described(event, key, id_header):
    attributes = {}
    for name, value in event.get_attributes().items():
        attributes[name] = value.isoformat() if hasattr(value, "isoformat") else value
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = json.loads(data) if data else None
    return {"key": key, "id_header": id_header, "attributes": attributes, "data": data}


def read_kafka(brokers, topic, count, deadline):
    try:
        from confluent_kafka import Consumer, TopicPartition
    except ImportError as e:  # pragma: no cover
        print(f"confluent-kafka is missing ({e}); pip install confluent-kafka", file=sys.stderr)
        sys.exit(3)
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"cloudevents-check-{time.time()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = metadata.topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    out = []
    while len(out) < count and time.time() < deadline:
        m = consumer.poll(0.5)
        if m is None or m.error():
            continue
        headers = {k: (v or b"") for k, v in (m.headers() or [])}
        message = ce_kafka.KafkaMessage(headers=headers, key=m.key(), value=m.value() or b"")
        event = ce_kafka.from_kafka(message, JSONFormat())
        key = m.key().decode() if m.key() is not None else None
        out.append(described(event, key, headers.get("id", b"").decode()))
    consumer.close()
    return out


def read_rabbitmq(url, queue, count, deadline):
    try:
        import pika
    except ImportError as e:  # pragma: no cover
        print(f"pika is missing ({e}); pip install pika", file=sys.stderr)
        sys.exit(3)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    out = []
    while len(out) < count and time.time() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.2)
            continue
        headers = {
            k: (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in (properties.headers or {}).items()
        }
        message = ce_rabbitmq.RabbitMQMessage(
            headers=headers, content_type=properties.content_type, body=body or b""
        )
        event = ce_rabbitmq.from_rabbitmq(message, JSONFormat())
        out.append(described(event, method.routing_key, headers.get("id") or properties.message_id))
    connection.close()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("broker", choices=["kafka", "rabbitmq"])
    parser.add_argument("--brokers")
    parser.add_argument("--topic")
    parser.add_argument("--url")
    parser.add_argument("--queue")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    deadline = time.time() + args.seconds
    if args.broker == "kafka":
        events = read_kafka(args.brokers, args.topic, args.count, deadline)
    else:
        events = read_rabbitmq(args.url, args.queue, args.count, deadline)
    for event in events:
        print(json.dumps(event))


if __name__ == "__main__":
    main()
