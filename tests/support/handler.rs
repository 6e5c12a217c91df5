//! The consumer runtime's test handler, shared by the suites of every
//! broker: it records each applied message in `effects`, and fails, panics
//! or waits on the messages a test names.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use outbox_relay::consumer::{self, HandlerError, Message};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

/// Creates the table the handler writes to.
pub async fn create_effects_table(pool: &PgPool) {
    sqlx::query(
        "create table effects (seq bigint generated always as identity, \
         message_id uuid not null, key text not null, n bigint not null)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// One produced message: its id, key and place among its key's messages.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: Uuid,
    pub key: String,
    pub n: i64,
}

/// What the test handler does; shared with the test.
#[derive(Default)]
pub struct Script {
    /// Handler runs per message id.
    pub calls: Mutex<HashMap<Uuid, u32>>,
    /// Fails permanently while `accept` is false.
    pub poison: Mutex<HashSet<Uuid>>,
    /// Fails transiently while `accept` is false.
    pub flaky: Mutex<HashSet<Uuid>>,
    /// Fails transiently this many more times.
    pub fail_times: Mutex<HashMap<Uuid, u32>>,
    pub accept: AtomicBool,
    /// The message whose handler panics.
    pub panic_on: Mutex<Option<Uuid>>,
    /// The message whose handler waits for `release`; `entered` when it does.
    pub hold: Mutex<Option<Uuid>>,
    pub entered: Notify,
    pub release: Notify,
}

pub struct Effects(pub Arc<Script>);

impl consumer::Handler for Effects {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
    ) -> Result<(), HandlerError> {
        let script = &self.0;
        *script.calls.lock().unwrap().entry(message.id).or_default() += 1;
        let accept = script.accept.load(Ordering::SeqCst);
        if *script.panic_on.lock().unwrap() == Some(message.id) {
            panic!("a bug in the handler");
        }
        if !accept && script.poison.lock().unwrap().contains(&message.id) {
            return Err(HandlerError::permanent("this message breaks a rule"));
        }
        if !accept && script.flaky.lock().unwrap().contains(&message.id) {
            return Err(HandlerError::transient("a dependency is down"));
        }
        if let Some(left) = script.fail_times.lock().unwrap().get_mut(&message.id)
            && *left > 0
        {
            *left -= 1;
            return Err(HandlerError::transient("a lock timed out"));
        }
        let payload: serde_json::Value = message.json()?;
        sqlx::query("insert into effects (message_id, key, n) values ($1, $2, $3)")
            .bind(message.id)
            .bind(payload["key"].as_str())
            .bind(payload["n"].as_i64())
            .execute(&mut **tx)
            .await?;
        let held = *script.hold.lock().unwrap() == Some(message.id);
        if held {
            script.entered.notify_one();
            script.release.notified().await;
        }
        Ok(())
    }
}

/// Each sent message applied exactly once, and per key in the order sent.
pub fn assert_once_in_order(effects: &[(Uuid, String, i64)], sent: &[Sent]) {
    let mut count: HashMap<Uuid, usize> = HashMap::new();
    for (id, _, _) in effects {
        *count.entry(*id).or_default() += 1;
    }
    let twice: Vec<&Uuid> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let missing: Vec<Uuid> = sent
        .iter()
        .map(|s| s.id)
        .filter(|id| !count.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "never applied: {missing:?}");
    assert_eq!(effects.len(), sent.len(), "effects of messages never sent");
    let mut per_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for (_, key, n) in effects {
        per_key.entry(key).or_default().push(*n);
    }
    for (key, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "messages of {key} applied out of order");
    }
}
