//! `walletctl demo`: a scenario against a running cluster, through the REST gateway and the
//! query service, as a client would use them: wallets in two currencies, deposits, payments
//! across shards with fees, a refused overdraft and an account hierarchy; it ends with the
//! balances, the hierarchy's roll-up and a conservation check per currency.

use std::collections::BTreeMap;

use proto::query::v1 as pb;
use proto::query::v1::account_query_client::AccountQueryClient;
use proto::query::v1::hierarchy_client::HierarchyClient;
use serde_json::{Value, json};

use crate::cluster::{ClusterInfo, DEMO_TENANT};
use crate::{Error, Result};

const PAYMENTS: usize = 60;

struct Api {
    client: reqwest::Client,
    url: String,
    key: String,
    /// Makes every idempotency key of this run new, so the demo can run again.
    run: String,
}

impl Api {
    async fn post(&self, path: &str, key: &str, body: Value) -> Result<(u16, Value)> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .header("Idempotency-Key", format!("{}-{key}", self.run))
            .json(&body)
            .send()
            .await
            .map_err(|error| Error::Setup(format!("POST {path}: {error}")))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn created(&self, path: &str, key: &str, body: Value) -> Result<Value> {
        match self.post(path, key, body).await? {
            (201, body) => Ok(body),
            (status, body) => Err(Error::Setup(format!("POST {path}: {status} {body}"))),
        }
    }
}

fn text(value: &Value, field: &str) -> Result<String> {
    value[field]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Setup(format!("no {field} in {value}")))
}

pub async fn run(cluster: &ClusterInfo) -> Result<()> {
    let query_address = cluster
        .processes
        .iter()
        .find(|p| p.role == "query")
        .map(|p| p.address.clone())
        .ok_or_else(|| Error::Setup("cluster.json lists no query service".into()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let api = Api {
        client: reqwest::Client::new(),
        url: cluster.gateway_url.clone(),
        key: cluster.api_key.clone(),
        run: format!("demo-{nanos:x}"),
    };

    // Wallets in two currencies, each funded with a deposit.
    let people = [
        ("alice", "USD"),
        ("bob", "USD"),
        ("carol", "USD"),
        ("dave", "EUR"),
        ("erin", "EUR"),
    ];
    let mut wallets: Vec<(String, &str, String)> = Vec::new();
    for (done, (name, currency)) in people.iter().enumerate() {
        let wallet = api
            .created(
                "/v1/wallets",
                &format!("wallet-{name}"),
                json!({ "owner_id": name, "currency": currency }),
            )
            .await?;
        let id = text(&wallet, "wallet_id")?;
        api.created(
            "/v1/deposits",
            &format!("deposit-{name}"),
            json!({ "wallet_id": id, "amount": "1000.00", "currency": currency }),
        )
        .await?;
        wallets.push((name.to_string(), currency, id));
        query::progress::draw("wallets ", done as u64 + 1, people.len() as u64);
    }

    // Payments between wallets of the same currency (across shards), each with a fee.
    let mut last_token = String::new();
    for n in 0..PAYMENTS {
        let from = n % wallets.len();
        let same: Vec<usize> = (0..wallets.len())
            .filter(|i| *i != from && wallets[*i].1 == wallets[from].1)
            .collect();
        let to = same[n % same.len()];
        let amount = format!("{}.{:02}", 1 + n % 20, (n * 7) % 100);
        let paid = api
            .created(
                "/v1/payments",
                &format!("payment-{n}"),
                json!({
                    "from_wallet_id": wallets[from].2, "to_wallet_id": wallets[to].2,
                    "amount": amount, "currency": wallets[from].1, "fee": { "amount": "0.25" },
                    "metadata": { "demo": "payment" }
                }),
            )
            .await?;
        last_token = text(&paid, "consistency_token")?;
        query::progress::draw("payments", n as u64 + 1, PAYMENTS as u64);
    }

    // An overdraft is refused and moves nothing.
    let (status, problem) = api
        .post(
            "/v1/payments",
            "overdraft",
            json!({
                "from_wallet_id": wallets[0].2, "to_wallet_id": wallets[1].2,
                "amount": "1000000.00", "currency": "USD"
            }),
        )
        .await?;
    println!(
        "overdraft: {status} {}",
        problem["type"].as_str().unwrap_or("")
    );
    if status != 422 {
        return Err(Error::Setup(format!(
            "the overdraft was not refused: {problem}"
        )));
    }

    // A hold: authorized on alice's wallet, part of it captured to bob (the rest released);
    // another one voided.
    let hold = api
        .created(
            "/v1/holds",
            "hold-1",
            json!({ "wallet_id": wallets[0].2, "amount": "50.00", "currency": "USD" }),
        )
        .await?;
    let hold_id = text(&hold, "hold_id")?;
    let captured = api
        .created(
            &format!("/v1/holds/{hold_id}/capture"),
            "capture-1",
            json!({ "to_wallet_id": wallets[1].2, "amount": "30.00" }),
        )
        .await?;
    let voided = api
        .created(
            "/v1/holds",
            "hold-2",
            json!({ "wallet_id": wallets[0].2, "amount": "20.00", "currency": "USD" }),
        )
        .await?;
    let voided_id = text(&voided, "hold_id")?;
    let (status, voided) = api
        .post(
            &format!("/v1/holds/{voided_id}/void"),
            "void-2",
            json!(null),
        )
        .await?;
    if status != 200 {
        return Err(Error::Setup(format!("the void was refused: {voided}")));
    }
    println!(
        "holds: 50.00 authorized, 30.00 captured ({}), 20.00 {}",
        text(&captured, "status")?,
        text(&voided, "status")?
    );
    // The reads below wait for the payments, the capture and the void.
    for write in [&captured, &voided] {
        last_token = format!("{last_token}.{}", text(write, "consistency_token")?);
    }

    // Every wallet and system account, as the read side has it once it has the last payment.
    let channel = auticuro::client::channel(&query_address)
        .map_err(|error| Error::Setup(format!("query service: {error}")))?;
    let mut accounts = AccountQueryClient::new(channel.clone());
    let token = access_gateway::api::consistency_token::decode(&last_token)
        .map_err(|error| Error::Setup(format!("the payment's consistency token: {error}")))?;
    let mut names: Vec<(String, String)> = wallets
        .iter()
        .map(|(name, _, id)| (name.clone(), id.clone()))
        .collect();
    for currency in ["USD", "EUR"] {
        for system in ["funding", "fees"] {
            let name = format!("sys:{system}:{currency}");
            names.push((name.clone(), name));
        }
    }
    println!("{:<18} {:>8} {:>14}", "account", "currency", "balance");
    for (name, id) in &names {
        let reply = accounts
            .get_balance(pb::GetBalanceRequest {
                tenant_id: DEMO_TENANT.into(),
                account_id: format!("{DEMO_TENANT}/{id}"),
                consistency_token: Some(token.clone()),
                wait_ms_max: 5_000,
            })
            .await
            .map_err(|status| Error::Setup(format!("balance of {name}: {status}")))?
            .into_inner();
        let Some(pb::get_balance_response::Reply::View(view)) = reply.reply else {
            return Err(Error::Setup(format!("no balance for {name}: {reply:?}")));
        };
        let account = view.account.unwrap_or_default();
        let minor: i128 = account
            .balance
            .as_ref()
            .and_then(|a| a.minor_units.parse().ok())
            .unwrap_or(0);
        let shown = format!("{}.{:02}", minor / 100, (minor % 100).abs());
        let shown = if minor < 0 && minor > -100 {
            format!("-{shown}")
        } else {
            shown
        };
        println!("{name:<18} {:>8} {shown:>14}", account.currency);
    }

    // A hierarchy: the company, with a team per currency.
    let mut tree = HierarchyClient::new(channel);
    let node = |result: pb::HierarchyResult| -> Result<String> {
        result
            .node
            .map(|node| node.node_id)
            .ok_or_else(|| Error::Setup(format!("hierarchy: {:?}", result.outcome)))
    };
    let create = |name: &str, parent: &str| pb::CreateNodeRequest {
        tenant_id: DEMO_TENANT.into(),
        name: name.into(),
        parent_id: parent.into(),
    };
    let hierarchy = |status: tonic::Status| Error::Setup(format!("hierarchy: {status}"));
    let company = node(
        tree.create_node(create("company", ""))
            .await
            .map_err(hierarchy)?
            .into_inner(),
    )?;
    let mut teams = BTreeMap::new();
    for currency in ["USD", "EUR"] {
        let team = create(&format!("{currency} team"), &company);
        teams.insert(
            currency,
            node(
                tree.create_node(team)
                    .await
                    .map_err(hierarchy)?
                    .into_inner(),
            )?,
        );
    }
    for (_, currency, id) in &wallets {
        let attach = pb::AttachAccountRequest {
            tenant_id: DEMO_TENANT.into(),
            node_id: teams[currency].clone(),
            account_id: format!("{DEMO_TENANT}/{id}"),
        };
        node(
            tree.attach_account(attach)
                .await
                .map_err(hierarchy)?
                .into_inner(),
        )?;
    }
    println!(
        "{:<18} {:>8} {:>14}",
        "hierarchy node", "currency", "balance"
    );
    let mut nodes = vec![("company".to_string(), company)];
    nodes.extend(
        teams
            .iter()
            .map(|(c, id)| (format!("  {c} team"), id.clone())),
    );
    for (label, node_id) in nodes {
        let balance = tree
            .get_node_balance(pb::GetNodeBalanceRequest {
                tenant_id: DEMO_TENANT.into(),
                node_id,
            })
            .await
            .map_err(hierarchy)?
            .into_inner();
        for line in balance.balances {
            let minor: i128 = line
                .balance
                .and_then(|a| a.minor_units.parse().ok())
                .unwrap_or(0);
            println!(
                "{label:<18} {:>8} {:>11}.{:02}",
                line.currency,
                minor / 100,
                minor % 100
            );
        }
    }

    // Money is neither created nor lost: per currency, every account of the tenant (wallets of
    // every run and the system accounts) sums to zero in the projection, which has the last
    // payment (the balance reads above waited for it).
    let pool = query::store::connect(&cluster.database_url)
        .await
        .map_err(|error| Error::Setup(format!("the query database: {error}")))?;
    let sums: Vec<(String, String)> = sqlx::query_as(
        "SELECT currency, balance::text FROM balances_per_currency WHERE tenant_id = $1
         ORDER BY currency",
    )
    .bind(DEMO_TENANT)
    .fetch_all(&pool)
    .await
    .map_err(|error| Error::Setup(format!("the query database: {error}")))?;
    let unbalanced: Vec<String> = sums
        .iter()
        .filter(|(_, sum)| sum != "0")
        .map(|(currency, sum)| format!("{currency} {sum}"))
        .collect();
    if !unbalanced.is_empty() {
        return Err(Error::Setup(format!(
            "not conserved: {}",
            unbalanced.join(", ")
        )));
    }
    let currencies: Vec<&str> = sums.iter().map(|(currency, _)| currency.as_str()).collect();
    println!(
        "money conserved: {} each sum to zero over all of the tenant's accounts",
        currencies.join(" and ")
    );
    Ok(())
}
