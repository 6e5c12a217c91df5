//! The throwaway Postgres: one cluster per test binary, a fresh database per test.

use super::*;

static SHARED_PG: tokio::sync::OnceCell<(u16, String)> = tokio::sync::OnceCell::const_new();
static HELD: Mutex<Option<TempPostgres>> = Mutex::new(None);

extern "C" fn stop_shared_pg() {
    if let Ok(mut held) = HELD.lock() {
        held.take();
    }
}

/// A fresh database in the binary's shared throwaway cluster; returns its URL.
pub async fn fresh_database() -> String {
    let (_, template) = SHARED_PG
        .get_or_init(|| async {
            let pg = TempPostgres::start()
                .await
                .expect("start the throwaway Postgres");
            let port = pg.port();
            let template = pg.url("{db}");
            *HELD.lock().unwrap() = Some(pg);
            // SAFETY: registering a plain extern "C" fn; it only drops the cluster.
            unsafe { libc::atexit(stop_shared_pg) };
            (port, template)
        })
        .await;
    let name = format!("t_{}", Uuid::new_v4().simple());
    let admin = template.replace("{db}", "postgres");
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("create database {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    template.replace("{db}", &name)
}

/// Runs `outbox-relay migrate` through the library and returns a pool.
pub async fn migrated_pool(url: &str) -> PgPool {
    let db = outbox_relay::config::DatabaseConfig::from_url(
        url,
        outbox_relay::config::Identifier::parse("public", "--schema").unwrap(),
        "--database-url",
    )
    .unwrap();
    let publication =
        outbox_relay::config::Identifier::parse("outbox_relay", "--publication").unwrap();
    outbox_relay::database::migrate(&db, &publication)
        .await
        .unwrap();
    PgPoolOptions::new()
        .max_connections(10)
        .connect(url)
        .await
        .unwrap()
}

/// Rows still in the outbox.
pub async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows the relay process `pid` deleted from the outbox, as recorded by a
/// test's `confirm_audit` trigger (which stores each deleting session's
/// application name, `outbox-relay HOST/PID/NONCE`, and its row count).
pub async fn confirmed_by(pool: &PgPool, pid: u32) -> i64 {
    sqlx::query_scalar(
        "select coalesce(sum(rows), 0)::bigint from confirm_audit where app like '%/' || $1 || '/%'",
    )
    .bind(pid.to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}
