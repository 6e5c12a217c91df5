//! Writes an event inside a business transaction and claims a message id
//! twice, as a service and its consumer would, using only the light
//! library. Usage: `light-service DATABASE_URL`.

use outbox_relay::inbox::{self, Claim};
use outbox_relay::outbox::{self, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).ok_or("usage: light-service DATABASE_URL")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    outbox_relay::MIGRATOR.run(&pool).await?;

    let mut tx = pool.begin().await?;
    let event = Event::new("order", "o-1", "order.placed", serde_json::json!({"total": 42}));
    outbox::insert(&mut tx, &event).await?;
    tx.commit().await?;
    println!("inserted {}", event.id);

    // The consumer side: the id arrives in the record's `id` header.
    let header = event.id.to_string();
    let id = inbox::message_id(Some(header.as_bytes()))?;
    for _ in 0..2 {
        let mut tx = pool.begin().await?;
        let claim = inbox::claim(&mut tx, "billing", id).await?;
        tx.commit().await?;
        println!("claim {}", if claim == Claim::New { "new" } else { "duplicate" });
    }
    Ok(())
}
