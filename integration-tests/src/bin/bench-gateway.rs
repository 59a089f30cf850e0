//! bench-gateway: end-to-end REST payments through the access gateway (HTTP, API key,
//! idempotency record in Postgres, coordinator transaction over two storage shards of three
//! replicas each, fsync on), and the same workload against a plain Postgres ledger (a balances
//! table updated with row locks inside one SQL transaction per payment, fsync on, the clients
//! sharing a pool of connections) on the same machine and the same Postgres server. Prints both,
//! side by side with the ratio, as a table and JSON.
//!
//! Run with a release build: `cargo run --release -p integration-tests --bin bench-gateway`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use integration_tests::bench::{self, PhaseReport};
use integration_tests::gateway::Gateway;
use integration_tests::platform::Platform;
use serde::Serialize;
use serde_json::json;

consensus::service_allocator!();

#[derive(Parser, Debug)]
#[command(about = "REST payments through the gateway against a plain Postgres ledger")]
struct Args {
    /// Concurrent clients, each waiting for its payment's answer before the next.
    #[arg(long, default_value_t = 128)]
    clients: usize,
    #[arg(long, default_value_t = 200)]
    wallets: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Postgres connections the plain ledger's clients share (at most one per client), as an
    /// application server's pool would. The default is the ledger's best on a two-core machine
    /// (16, 32, 64 and 128 measured with 128 clients).
    #[arg(long, default_value_t = 16)]
    ledger_connections: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    phases: Vec<PhaseReport>,
    /// Gateway payments/s over Postgres ledger payments/s.
    ratio: f64,
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

async fn gateway_phase(args: &Args) -> anyhow::Result<PhaseReport> {
    eprintln!(
        "starting a topology group, 2 storage shards and 1 coordinator shard (3 replicas each) and the gateway…"
    );
    let platform = Platform::start_with_topology(1).await;
    // The per-key rate limit (1,000/s by default) would cap the benchmark's one key.
    let gateway = Arc::new(
        Gateway::start_with(&platform, &["--requests-per-second-max", "1000000000"]).await?,
    );
    let key = gateway.create_key("bench", "read,write").await?;
    eprintln!("creating and funding {} wallets…", args.wallets);
    let mut wallets = Vec::new();
    for index in 0..args.wallets {
        let created = gateway
            .post(
                "/v1/wallets",
                &key,
                &format!("wallet-{index}"),
                json!({ "owner_id": "bench", "currency": "USD" }),
            )
            .await;
        let wallet = created.text("wallet_id");
        let funded = gateway
            .post(
                "/v1/deposits",
                &key,
                &format!("fund-{index}"),
                json!({ "wallet_id": wallet, "amount": "1000000.00", "currency": "USD" }),
            )
            .await;
        anyhow::ensure!(funded.status.is_success(), "funding failed: {funded:?}");
        wallets.push(wallet);
    }
    let wallets = Arc::new(wallets);
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    eprintln!("running {} clients for {} s…", args.clients, args.seconds);
    let counted = Arc::clone(&statuses);
    let report = bench::closed_loop("gateway REST payments", args.clients, args.seconds, move |_, mut rng| {
        let (gateway, wallets, key) = (Arc::clone(&gateway), Arc::clone(&wallets), key.clone());
        let statuses = Arc::clone(&counted);
        async move {
            let from = rng.below(wallets.len());
            let to = (from + 1 + rng.below(wallets.len() - 1)) % wallets.len();
            let idempotency_key = format!("pay-{}", NEXT_KEY.fetch_add(1, Ordering::Relaxed));
            let body = json!({ "from_wallet_id": wallets[from], "to_wallet_id": wallets[to], "amount": "0.01", "currency": "USD" });
            let answer = gateway.post("/v1/payments", &key, &idempotency_key, body).await;
            let status = answer.status.as_u16();
            *statuses.lock().expect("no poisoned lock").entry(status).or_default() += 1;
            Ok((status == 201, rng))
        }
    })
    .await?;
    let statuses = statuses.lock().expect("no poisoned lock");
    let counts: Vec<String> = statuses
        .iter()
        .map(|(status, count)| format!("{status} ×{count}"))
        .collect();
    eprintln!("gateway answers by HTTP status: {}", counts.join(", "));
    Ok(report)
}

async fn postgres_phase(args: &Args) -> anyhow::Result<PhaseReport> {
    let database = integration_tests::postgres::fresh_database().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.clients.min(args.ledger_connections) as u32)
        .connect(&database.url)
        .await?;
    sqlx::query("CREATE TABLE balances (id integer PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE TABLE payments (id bigserial PRIMARY KEY, from_id integer NOT NULL, to_id integer NOT NULL, amount bigint NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO balances SELECT g, 100000000 FROM generate_series(0, $1) g")
        .bind(args.wallets as i32 - 1)
        .execute(&pool)
        .await?;
    let wallets = args.wallets;
    bench::closed_loop(
        "postgres ledger payments",
        args.clients,
        args.seconds,
        move |_, mut rng| {
            let pool = pool.clone();
            async move {
                let from = rng.below(wallets) as i32;
                let to = ((from as usize + 1 + rng.below(wallets - 1)) % wallets) as i32;
                let mut transaction = pool.begin().await?;
                // Lock both rows in id order so concurrent payments never deadlock.
                sqlx::query(
                    "SELECT balance FROM balances WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .bind(vec![from, to])
                .fetch_all(&mut *transaction)
                .await?;
                let debited = sqlx::query(
                    "UPDATE balances SET balance = balance - 1 WHERE id = $1 AND balance >= 1",
                )
                .bind(from)
                .execute(&mut *transaction)
                .await?;
                sqlx::query("UPDATE balances SET balance = balance + 1 WHERE id = $1")
                    .bind(to)
                    .execute(&mut *transaction)
                    .await?;
                sqlx::query("INSERT INTO payments (from_id, to_id, amount) VALUES ($1, $2, 1)")
                    .bind(from)
                    .bind(to)
                    .execute(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                Ok((debited.rows_affected() == 1, rng))
            }
        },
    )
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.wallets >= 2, "at least two wallets");
    let gateway = gateway_phase(&args).await?;
    eprintln!("running the same workload against a plain Postgres ledger…");
    let postgres = postgres_phase(&args).await?;
    let ratio = gateway.operations_per_second / postgres.operations_per_second;
    let phases = vec![gateway, postgres];
    bench::print_table("payments", &phases);
    println!("gateway / postgres ledger: {ratio:.2}×");
    bench::emit_json(
        &Report {
            benchmark: "gateway-payments",
            phases,
            ratio,
        },
        args.json.as_deref(),
    )
}
