//! A service writing business rows and their events in one transaction.
//!
//! ```text
//! cargo run --example writer -- --database-url postgres://... --orders 100
//! ```
//!
//! Each order is inserted into `orders` and an `order.created` event into
//! the outbox in the same transaction: both commit or neither does. Run
//! `outbox-relay migrate` on the database first.

use anyhow::Context;
use clap::Parser;
use outbox_relay::outbox::{self, Event};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// How many orders to place.
    #[arg(long, default_value_t = 10)]
    orders: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await
        .context("connecting to --database-url")?;
    sqlx::query(
        "create table if not exists orders (id uuid primary key, customer text not null, total_cents bigint not null)",
    )
    .execute(&pool)
    .await?;

    for i in 0..args.orders {
        let order_id = uuid::Uuid::new_v4();
        let customer = format!("customer-{}", i % 7);
        let total_cents = 1000 + i64::from(i);

        let mut tx = pool.begin().await?;
        sqlx::query("insert into orders (id, customer, total_cents) values ($1, $2, $3)")
            .bind(order_id)
            .bind(&customer)
            .bind(total_cents)
            .execute(&mut *tx)
            .await?;
        let event = Event::new(
            "order",
            order_id.to_string(),
            "order.created",
            json!({"order_id": order_id, "customer": customer, "total_cents": total_cents}),
        )
        .with_header("schema_version", "1");
        outbox::insert(&mut tx, &event).await?;
        tx.commit().await?;
    }
    println!(
        "placed {} orders; the relay publishes them to order.events",
        args.orders
    );
    Ok(())
}
