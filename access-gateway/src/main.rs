//! `access-gateway`: serves the REST API, or manages API keys (an operator command).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use access_gateway::auth::Scope;
use clap::{Parser, Subcommand};

consensus::service_allocator!();

#[derive(Parser, Debug)]
#[command(version, about = "The wallet platform's REST API gateway")]
struct Args {
    /// Postgres for API keys and idempotency records.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API.
    Serve {
        /// Port 0 picks a free port; the `ready ADDRESS` line says which.
        #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Replicas of the topology group, `ADDRESS,ADDRESS,…`.
        #[arg(long, env = "GATEWAY_TOPOLOGY", value_delimiter = ',', required = true)]
        topology: Vec<String>,
        #[arg(long, env = "GATEWAY_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
        request_timeout_ms: u64,
        /// Requests per second allowed per API key.
        #[arg(long, env = "GATEWAY_REQUESTS_PER_SECOND_MAX", default_value_t = NonZeroU32::new(1_000).unwrap())]
        requests_per_second_max: NonZeroU32,
        #[arg(long, env = "GATEWAY_BODY_BYTES_MAX", default_value_t = 16 * 1024)]
        body_bytes_max: usize,
        /// The query service (`query serve`), `ADDRESS`, for activity feeds.
        #[arg(long, env = "GATEWAY_QUERY")]
        query: Option<String>,
    },
    /// Issue an API key for a tenant; prints the key once (only its hash is stored).
    CreateKey {
        #[arg(long)]
        tenant: String,
        /// Comma-separated: read, write, admin (the tenant's admin), operator (the platform's
        /// status; not implied by admin).
        #[arg(long, value_delimiter = ',', default_value = "read,write")]
        scopes: Vec<String>,
    },
    /// Revoke an API key by its id (the part after `wk_` and before the next `_`).
    RevokeKey {
        #[arg(long)]
        key_id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    consensus::init_logging();
    let args = Args::parse();
    let database_url = args
        .database_url
        .ok_or_else(|| anyhow::anyhow!("--database-url (or DATABASE_URL) is required"))?;
    let pool = access_gateway::store::connect(&database_url).await?;
    match args.command {
        Command::Serve {
            listen,
            topology,
            request_timeout_ms,
            requests_per_second_max,
            body_bytes_max,
            query,
        } => {
            let query = query
                .map(|address| {
                    auticuro::client::channel(&address)
                        .map_err(|error| anyhow::anyhow!("--query {address}: {error}"))
                })
                .transpose()?;
            let cluster = access_gateway::cluster::Cluster::follow(topology);
            let options = access_gateway::Options {
                request_timeout: Duration::from_millis(request_timeout_ms),
                requests_per_second_max,
                body_bytes_max,
            };
            let state = Arc::new(access_gateway::AppState::new(pool, cluster, options, query));
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("ready {}", listener.local_addr()?);
            axum::serve(listener, access_gateway::router(state)).await?;
        }
        Command::CreateKey { tenant, scopes } => {
            let scopes = Scope::parse_all(&scopes)?;
            let key = access_gateway::store::create_key(&pool, &tenant, &scopes).await?;
            println!("{}", key.token);
        }
        Command::RevokeKey { key_id } => {
            anyhow::ensure!(
                access_gateway::store::revoke_key(&pool, &key_id).await?,
                "no live key {key_id:?}"
            );
            println!("revoked {key_id}");
        }
    }
    Ok(())
}
