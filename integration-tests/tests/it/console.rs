//! The operator console in headless Chromium (driven by playwright-core, see
//! `integration-tests/console/e2e.cjs`) against a real cluster: topology, two storage shards, a
//! coordinator shard, the query service, the gateway and Postgres. Screenshots of each page are
//! kept under `$CARGO_TARGET_DIR/console-screenshots/`.

use auticuro::ledger::AccountId;
use auticuro::routing::SlotTable;
use integration_tests::gateway::Gateway;
use integration_tests::platform::Platform;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn the_console_edits_hierarchies_in_a_real_browser() {
    let mut platform =
        Platform::start_with_topology_and(1, &["--reserve-timeout-ms", "60000"]).await;
    let gateway = Gateway::start(&platform).await.unwrap();
    // The console's operator: the tenant's admin and the platform's operator (cluster page).
    let admin = gateway.create_key("acme", "admin,operator").await.unwrap();
    let reader = gateway.create_key("acme", "read").await.unwrap();
    let writer = gateway.create_key("acme", "read,write").await.unwrap();
    // Alice's wallet on storage shard 1, bob's on shard 2.
    let mut wallets = Vec::new();
    for (name, shard_id) in [("alice", 1), ("bob", 2)] {
        for attempt in 0.. {
            let created = gateway
                .post(
                    "/v1/wallets",
                    &writer,
                    &format!("console-{name}-{attempt}"),
                    json!({ "owner_id": name, "currency": "USD" }),
                )
                .await;
            assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
            let wallet = created.text("wallet_id");
            let account = AccountId::parse(&format!("acme/{wallet}")).unwrap();
            if SlotTable::uniform(&[1, 2]).shard_of(&account) == shard_id {
                wallets.push(wallet);
                break;
            }
            assert!(attempt < 64, "no wallet landed on shard {shard_id}");
        }
    }
    let screenshots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);
    std::fs::create_dir_all(&screenshots).unwrap();
    let browser = |phase: &str, stuck: &str| {
        tokio::process::Command::new("node")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/console/e2e.cjs"))
            .env("PHASE", phase)
            .env("STUCK_TRANSACTION", stuck)
            .env("GATEWAY_URL", &gateway.url)
            .env("ADMIN_KEY", &admin)
            .env("READ_KEY", &reader)
            .env("WRITE_KEY", &writer)
            .env("WALLETS", wallets.join(","))
            .env("SCREENSHOTS", &screenshots)
            .output()
    };
    let passed = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    passed(
        browser("main", "")
            .await
            .expect("node runs (scripts/setup.sh installs it)"),
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
    // A tenant's admin is no operator of the platform: its status is not theirs to see.
    let cluster = gateway.get("/v1/admin/cluster", &stranger).await;
    assert_eq!(cluster.status, StatusCode::FORBIDDEN, "{cluster:?}");
    let cluster = gateway.get("/v1/admin/cluster", &admin).await;
    assert_eq!(cluster.status, StatusCode::OK, "{cluster:?}");
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
    let found = gateway.get("/v1/wallets?owner_id=alice", &stranger).await;
    assert_eq!(found.body["wallet_ids"], json!([]), "{found:?}");
    // Alice owns every wallet created for her above (until one landed on shard 1).
    let found = gateway.get("/v1/wallets?owner_id=alice", &reader).await;
    let alices = found.body["wallet_ids"].as_array().unwrap();
    assert!(alices.contains(&json!(wallets[0])), "{found:?}");
    assert!(!alices.contains(&json!(wallets[1])), "{found:?}");
    // Versions page by page, newest first.
    let versions = |query: String| {
        let path = format!("/v1/wallets/{}/versions?{query}", wallets[0]);
        let (gateway, reader) = (&gateway, &reader);
        async move { gateway.get(&path, reader).await }
    };
    let first = versions("page_size=2".into()).await;
    let numbers = |answer: &integration_tests::gateway::Answer| -> Vec<u64> {
        answer.body["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(numbers(&first), [4, 3], "{first:?}");
    let next = first.body["next_before_version"].as_u64().unwrap();
    let rest = versions(format!("page_size=2&before_version={next}")).await;
    assert_eq!(numbers(&rest), [2, 1], "{rest:?}");
    let foreign = gateway
        .get(&format!("/v1/wallets/{}/versions", wallets[0]), &stranger)
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
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
    // A payment stuck on a shard that is down: the admin sees it in flight and aborts it.
    for node_id in 1..=3 {
        platform.storage[1].kill(node_id).await.unwrap();
    }
    let pending = gateway
        .post(
            "/v1/payments",
            &writer,
            "console-stuck",
            json!({ "from_wallet_id": wallets[0], "to_wallet_id": wallets[1], "amount": "1.00", "currency": "USD" }),
        )
        .await;
    assert_eq!(pending.status, StatusCode::ACCEPTED, "{pending:?}");
    passed(
        browser("in-flight", &pending.text("transaction_id"))
            .await
            .unwrap(),
    );
    for node_id in 1..=3 {
        platform.storage[1].restart(node_id).await.unwrap();
    }
    for page in [
        "sign-in",
        "hierarchy",
        "account",
        "transaction",
        "read-only",
        "in-flight",
        "cluster",
    ] {
        let shot = screenshots.join(format!("{page}.png"));
        let size = std::fs::metadata(&shot).map_or(0, |m| m.len());
        assert!(size > 1_000, "{} is missing or empty", shot.display());
    }
}
