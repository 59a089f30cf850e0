//! `walletctl up`: one command runs a complete local cluster that serves payments.

use integration_tests::gateway::Gateway;
use integration_tests::process::{spawn, workspace_binary};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

async fn post(client: &Client, url: &str, key: &str, idempotency_key: &str, body: Value) -> Value {
    let response = client
        .post(url)
        .bearer_auth(key)
        .header("Idempotency-Key", idempotency_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn walletctl_up_runs_a_cluster_that_serves_payments() {
    let data_dir = integration_tests::process::fresh_data_dir("walletctl-").unwrap();
    let args = [
        "up",
        "--data-dir",
        &data_dir.path().display().to_string(),
        "--base-port",
        "0",
        "--gateway-listen",
        "127.0.0.1:0",
    ]
    .map(String::from);
    let walletctl = spawn(&workspace_binary("walletctl"), &args).await.unwrap();
    let url = format!("http://{}", walletctl.address());
    let key = std::fs::read_to_string(data_dir.path().join("api-key")).unwrap();
    let client = Client::new();

    let mut wallets = Vec::new();
    for name in ["alice", "bob"] {
        let wallet = post(
            &client,
            &format!("{url}/v1/wallets"),
            &key,
            &format!("create-{name}"),
            json!({ "owner_id": name, "currency": "EUR" }),
        )
        .await;
        wallets.push(wallet["wallet_id"].as_str().unwrap().to_string());
    }
    post(
        &client,
        &format!("{url}/v1/deposits"),
        &key,
        "deposit",
        json!({ "wallet_id": wallets[0], "amount": "25.00", "currency": "EUR" }),
    )
    .await;
    let paid = post(
        &client,
        &format!("{url}/v1/payments"),
        &key,
        "pay",
        json!({ "from_wallet_id": wallets[0], "to_wallet_id": wallets[1], "amount": "10.00", "currency": "EUR" }),
    )
    .await;
    assert_eq!(paid["status"], "committed", "{paid}");
    let token = paid["consistency_token"].as_str().unwrap();
    for (wallet, expected) in wallets.iter().zip(["15.00", "10.00"]) {
        let balance = Gateway::send(
            client
                .get(format!(
                    "{url}/v1/wallets/{wallet}/balance?consistency_token={token}"
                ))
                .bearer_auth(&key),
        )
        .await;
        assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
        assert_eq!(balance.body["balance"], expected);
    }

    // Ctrl-C stops every process of the cluster, Postgres included.
    let status = std::process::Command::new("kill")
        .args(["-INT", &walletctl.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let postmaster = data_dir.path().join("postgres/data/postmaster.pid");
    for _ in 0..200 {
        if !postmaster.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!postmaster.exists(), "Postgres still runs");
}
