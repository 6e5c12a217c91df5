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

/// Waits until the relay confirmed every row (the outbox is empty).
pub async fn wait_until_drained(pool: &PgPool, deadline: Duration) {
    wait_for("the outbox to drain", deadline, || async {
        outbox_count(pool).await == 0
    })
    .await;
}

/// With `--retention`: a row is known to be published when a slot whose
/// lane covers its bucket recorded a published-before newer than the row's
/// transaction.
pub const KNOWN_PUBLISHED: &str = "exists (select 1 from relay_slot s \
     where s.published_before is not null \
     and s.bucket_from <= o.bucket and o.bucket < s.bucket_to \
     and age(o.xmin) > age((s.published_before::text::bigint % 4294967296)::text::xid))";

/// With `--retention`: rows not yet known to be published.
pub async fn not_known_published(pool: &PgPool) -> i64 {
    sqlx::query_scalar(&format!(
        "select count(*) from outbox o where not {KNOWN_PUBLISHED}"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Records every statement that deletes outbox rows (a confirm): which relay
/// instance ran it (its sessions carry the instance id, with the process id
/// in it, as their application_name), how many rows, and how many of them
/// are in a lane (of `shards`; 1: the whole outbox) whose lock the deleting
/// session did not hold.
pub async fn audit_confirms(pool: &PgPool, shards: usize) {
    let lane = match shards {
        1 => "'outbox-relay:public'".to_owned(),
        n => format!("'outbox-relay:public/' || (bucket::int * {n} / 1024) || '-of-{n}'"),
    };
    let function = format!(
        "create function audit_confirm() returns trigger language plpgsql as $$ begin \
         insert into confirm_audit (app, rows, unlocked) \
         select current_setting('application_name'), count(*), count(*) filter (where not exists ( \
           select 1 from pg_locks k where k.pid = pg_backend_pid() and k.locktype = 'advisory' \
           and k.granted and k.objsubid = 1 \
           and k.classid = ((hashtextextended(g.lane, 0) >> 32) & 4294967295)::oid \
           and k.objid = (hashtextextended(g.lane, 0) & 4294967295)::oid)) \
         from (select {lane} as lane from gone) g; \
         return null; end $$"
    );
    for statement in [
        "create table confirm_audit (app text not null, rows bigint not null, unlocked bigint not null, \
         at timestamptz not null default clock_timestamp())",
        function.as_str(),
        "create trigger audit_confirm after delete on outbox referencing old table as gone \
         for each statement execute function audit_confirm()",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

/// Rows confirmed by a session that did not hold the row's lane.
pub async fn confirmed_without_the_lane(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select coalesce(sum(unlocked), 0)::bigint from confirm_audit")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows the relay process `pid` deleted from the outbox, as recorded by
/// [`audit_confirms`].
pub async fn confirmed_by(pool: &PgPool, pid: u32) -> i64 {
    sqlx::query_scalar(
        "select coalesce(sum(rows), 0)::bigint from confirm_audit where app like '%/' || $1 || '/%'",
    )
    .bind(pid.to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}
