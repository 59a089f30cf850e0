//! The operator console in headless Chromium (driven by playwright-core, see
//! `integration-tests/console/e2e.cjs`) against a real cluster: topology, two storage shards, a
//! coordinator shard, the query service, the gateway and Postgres. Screenshots of each page are
//! kept under `$CARGO_TARGET_DIR/console-screenshots/`.

use integration_tests::gateway::Gateway;
use integration_tests::platform::Platform;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn the_console_edits_hierarchies_in_a_real_browser() {
    let platform = Platform::start_with_topology(1).await;
    let gateway = Gateway::start(&platform).await.unwrap();
    let admin = gateway.create_key("acme", "admin").await.unwrap();
    let reader = gateway.create_key("acme", "read").await.unwrap();
    let writer = gateway.create_key("acme", "read,write").await.unwrap();
    let mut wallets = Vec::new();
    for name in ["alice", "bob"] {
        let created = gateway
            .post(
                "/v1/wallets",
                &writer,
                &format!("console-{name}"),
                json!({ "owner_id": name, "currency": "USD" }),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        wallets.push(created.text("wallet_id"));
    }
    let screenshots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);
    std::fs::create_dir_all(&screenshots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/console/e2e.cjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .env("GATEWAY_URL", &gateway.url)
        .env("ADMIN_KEY", &admin)
        .env("READ_KEY", &reader)
        .env("WRITE_KEY", &writer)
        .env("WALLETS", wallets.join(","))
        .env("SCREENSHOTS", &screenshots)
        .output()
        .await
        .expect("node runs (scripts/setup.sh installs it, playwright-core and chromium)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Another tenant sees none of it and can edit none of it.
    let tree = gateway.get("/v1/hierarchy", &admin).await;
    assert_eq!(tree.body["nodes"].as_array().unwrap().len(), 3, "{tree:?}");
    let company = tree.body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["name"] == "Company SE")
        .unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let stranger = gateway.create_key("globex", "admin").await.unwrap();
    let theirs = gateway.get("/v1/hierarchy", &stranger).await;
    assert_eq!(theirs.body["nodes"], json!([]), "{theirs:?}");
    let rename = gateway
        .post(
            &format!("/v1/hierarchy/nodes/{company}/rename"),
            &stranger,
            "steal-rename",
            json!({ "name": "Ours" }),
        )
        .await;
    assert_eq!(
        rename.problem_type(),
        "/problems/node-not-found",
        "{rename:?}"
    );
    // A read-only key cannot edit through the API either.
    let refused = gateway
        .post(
            "/v1/hierarchy/nodes",
            &reader,
            "reader-create",
            json!({ "name": "Mine" }),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    for page in [
        "sign-in",
        "hierarchy",
        "account",
        "transaction",
        "read-only",
    ] {
        let shot = screenshots.join(format!("{page}.png"));
        let size = std::fs::metadata(&shot).map_or(0, |m| m.len());
        assert!(size > 1_000, "{} is missing or empty", shot.display());
    }
}
