//! The part of Postgres' `pgoutput` logical decoding protocol (version 1)
//! that tail mode needs: Relation messages, which give the outbox table's
//! column order, and Insert messages, decoded into [`OutboxRow`]s with the
//! same values poll mode reads with SQL. Begin and Commit are parsed by the
//! replication client; every other message (Type, Origin, Update, Delete,
//! Truncate) is skipped, as the publication only publishes inserts.
//!
//! Values arrive in text format. The replication session pins `DateStyle`
//! and `TimeZone`, so `created_at` always reads as ISO in UTC.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::outbox::OutboxRow;

/// A message that cannot be read as `pgoutput` v1, or an outbox row whose
/// values do not have the outbox's types.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn fail<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

/// One decoded message, borrowing from the WAL data.
#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    Relation(Relation),
    Insert {
        relation: u32,
        tuple: Vec<Option<&'a [u8]>>,
    },
    /// Anything tail mode does not act on.
    Other(u8),
}

/// A table's description, sent before its first change in a session and
/// again after its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// Decodes one `pgoutput` message.
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader(data);
    match r.u8()? {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?.to_owned();
            let name = r.cstr()?.to_owned();
            let _replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let _flags = r.u8()?;
                columns.push(r.cstr()?.to_owned());
                let _type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
            }
            Ok(Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return fail("pgoutput Insert without a new tuple");
            }
            let count = r.u16()?;
            let mut tuple = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                match r.u8()? {
                    b'n' => tuple.push(None),
                    b't' => {
                        let len = r.u32()? as usize;
                        tuple.push(Some(r.take(len)?));
                    }
                    b'u' => return fail("pgoutput Insert with an unchanged TOAST value"),
                    b'b' => return fail("pgoutput Insert with a binary value"),
                    other => return fail(format!("pgoutput tuple column kind {other:#04x}")),
                }
            }
            Ok(Message::Insert { relation, tuple })
        }
        other => Ok(Message::Other(other)),
    }
}

/// Where each outbox column sits in the table's tuples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxColumns {
    pub relation: u32,
    seq: usize,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    topic: usize,
    payload: usize,
    headers: usize,
    created_at: usize,
    /// Absent in a schema migrated before it existed.
    partition_key: Option<usize>,
}

impl OutboxColumns {
    /// The positions of the outbox's columns in `relation`; an error names a
    /// missing column.
    pub fn new(relation: &Relation) -> Result<Self, DecodeError> {
        let at = |name: &str| {
            relation
                .columns
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| {
                    DecodeError(format!(
                        "table {}.{} has no column {name}",
                        relation.namespace, relation.name
                    ))
                })
        };
        Ok(OutboxColumns {
            relation: relation.id,
            seq: at("seq")?,
            id: at("id")?,
            aggregate_type: at("aggregate_type")?,
            aggregate_id: at("aggregate_id")?,
            event_type: at("event_type")?,
            topic: at("topic")?,
            payload: at("payload")?,
            headers: at("headers")?,
            created_at: at("created_at")?,
            partition_key: at("partition_key").ok(),
        })
    }

    /// The outbox row an Insert's tuple holds.
    pub fn row(&self, tuple: &[Option<&[u8]>]) -> Result<OutboxRow, DecodeError> {
        let text = |i: usize, name: &str| -> Result<Option<&str>, DecodeError> {
            match tuple.get(i) {
                None => fail(format!("outbox insert is missing column {name}")),
                Some(None) => Ok(None),
                Some(Some(bytes)) => std::str::from_utf8(bytes)
                    .map(Some)
                    .map_err(|_| DecodeError(format!("outbox column {name} is not UTF-8"))),
            }
        };
        let required = |i: usize, name: &str| -> Result<&str, DecodeError> {
            text(i, name)?.ok_or_else(|| DecodeError(format!("outbox column {name} is null")))
        };
        let seq = required(self.seq, "seq")?;
        let id = required(self.id, "id")?;
        let headers = required(self.headers, "headers")?;
        let created_at = required(self.created_at, "created_at")?;
        Ok(OutboxRow {
            seq: seq
                .parse()
                .map_err(|_| DecodeError(format!("outbox seq {seq:?} is not a bigint")))?,
            id: Uuid::parse_str(id)
                .map_err(|_| DecodeError(format!("outbox id {id:?} is not a uuid")))?,
            aggregate_type: required(self.aggregate_type, "aggregate_type")?.to_owned(),
            aggregate_id: required(self.aggregate_id, "aggregate_id")?.to_owned(),
            event_type: required(self.event_type, "event_type")?.to_owned(),
            topic: text(self.topic, "topic")?.map(str::to_owned),
            payload: text(self.payload, "payload")?.map(str::to_owned),
            headers: sqlx::types::Json(
                serde_json::from_str::<Map<String, Value>>(headers).map_err(|e| {
                    DecodeError(format!("outbox headers are not a JSON object: {e}"))
                })?,
            ),
            created_at: parse_timestamptz(created_at)?,
            partition_key: match self.partition_key {
                Some(i) => text(i, "partition_key")?.map(str::to_owned),
                None => None,
            },
        })
    }
}

/// `2026-11-23 19:30:00.123456+00`, as Postgres prints a timestamptz with
/// `DateStyle=ISO` and `TimeZone=UTC`.
fn parse_timestamptz(text: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError(format!("outbox created_at {text:?}: {e}")))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return fail("pgoutput message is truncated");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("pgoutput string is not terminated".into()))?;
        let s = std::str::from_utf8(&self.0[..end])
            .map_err(|_| DecodeError("pgoutput string is not UTF-8".into()))?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: [&str; 9] = [
        "seq",
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "topic",
        "payload",
        "headers",
        "created_at",
    ];

    fn relation_message() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16_385u32.to_be_bytes());
        m.extend(b"public\0outbox\0");
        m.push(b'd');
        m.extend((COLUMNS.len() as u16).to_be_bytes());
        for name in COLUMNS {
            m.push(0);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn insert_message(values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(16_385u32.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(v) => {
                    m.push(b't');
                    m.extend((v.len() as u32).to_be_bytes());
                    m.extend(v.as_bytes());
                }
            }
        }
        m
    }

    #[test]
    fn an_insert_decodes_into_the_row_poll_mode_would_read() {
        let Message::Relation(relation) = decode(&relation_message()).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(
            (relation.namespace.as_str(), relation.name.as_str()),
            ("public", "outbox")
        );
        let columns = OutboxColumns::new(&relation).unwrap();
        let data = insert_message(&[
            Some("42"),
            Some("7f0c1c5e-8a4e-4d52-9d53-8a3f1b2c9e10"),
            Some("order"),
            Some("o-1"),
            Some("created"),
            None,
            Some(r#"{"total": 10}"#),
            Some(r#"{"traceparent": "00-ab"}"#),
            Some("2026-11-23 19:30:00.123456+00"),
        ]);
        let Message::Insert { relation, tuple } = decode(&data).unwrap() else {
            panic!("not an insert");
        };
        assert_eq!(relation, columns.relation);
        let row = columns.row(&tuple).unwrap();
        assert_eq!(row.seq, 42);
        assert_eq!(row.aggregate_id, "o-1");
        assert_eq!(row.topic, None);
        assert_eq!(row.payload.as_deref(), Some(r#"{"total": 10}"#));
        assert_eq!(row.headers.0["traceparent"], "00-ab");
        assert_eq!(
            row.created_at.to_rfc3339(),
            "2026-11-23T19:30:00.123456+00:00"
        );
    }

    #[test]
    fn the_partition_key_is_read_when_the_table_has_it() {
        let mut columns: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
        let values = [
            "1",
            "7f0c1c5e-8a4e-4d52-9d53-8a3f1b2c9e10",
            "order",
            "o-1",
            "created",
            "{}",
            "{}",
            "2026-11-23 19:30:00+00",
        ];
        let tuple = |key: Option<&'static str>| {
            let mut tuple: Vec<Option<&[u8]>> = vec![
                Some(values[0].as_bytes()),
                Some(values[1].as_bytes()),
                Some(values[2].as_bytes()),
                Some(values[3].as_bytes()),
                Some(values[4].as_bytes()),
                None,
                Some(values[5].as_bytes()),
                Some(values[6].as_bytes()),
                Some(values[7].as_bytes()),
            ];
            tuple.push(Some(b"17".as_slice())); // bucket
            tuple.push(key.map(str::as_bytes));
            tuple
        };
        let relation = |columns: Vec<String>| Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            columns,
        };
        // Before migration 0009: no such column, no key.
        let old = OutboxColumns::new(&relation(columns.clone())).unwrap();
        assert_eq!(old.row(&tuple(None)[..9]).unwrap().partition_key, None);
        columns.push("bucket".into());
        columns.push("partition_key".into());
        let new = OutboxColumns::new(&relation(columns)).unwrap();
        assert_eq!(
            new.row(&tuple(Some("tenant-7")))
                .unwrap()
                .partition_key
                .as_deref(),
            Some("tenant-7")
        );
        assert_eq!(new.row(&tuple(None)).unwrap().partition_key, None);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &b"I"[..],
            b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab",
            b"R\0\0\0\x01public",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decode(b"Y").unwrap(), Message::Other(b'Y'));
        let relation = Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            columns: vec!["seq".into()],
        };
        let err = OutboxColumns::new(&relation).unwrap_err().to_string();
        assert_eq!(err, "table public.outbox has no column id");
    }
}
