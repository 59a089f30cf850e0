//! `walletctl up`: one command runs a complete local cluster that serves payments.

use integration_tests::gateway::{Answer, Gateway};
use integration_tests::process::{ServiceProcess, spawn, workspace_binary};
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

async fn balance(client: &Client, url: &str, key: &str, wallet: &str, token: &str) -> Value {
    let balance = Gateway::send(
        client
            .get(format!(
                "{url}/v1/wallets/{wallet}/balance?consistency_token={token}"
            ))
            .bearer_auth(key),
    )
    .await;
    assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    balance.body["balance"].clone()
}

/// Starts `walletctl up` on `data_dir` with fixed ports from `base_port`. The directory is
/// given relative to the current one, as `scripts/run.sh` gives `.wallet`.
async fn up(data_dir: &std::path::Path, base_port: u16) -> ServiceProcess {
    let current = std::env::current_dir().unwrap();
    let mut relative = std::path::PathBuf::new();
    for _ in current.components().skip(1) {
        relative.push("..");
    }
    relative.push(data_dir.strip_prefix("/").unwrap());
    let args = [
        "up",
        "--data-dir",
        &relative.display().to_string(),
        "--base-port",
        &base_port.to_string(),
        "--gateway-addr",
        "127.0.0.1:0",
    ]
    .map(String::from);
    spawn(&workspace_binary("walletctl"), &args).await.unwrap()
}

/// A wallet's activity feed, read with a consistency token (so it includes that write).
async fn activities(client: &Client, url: &str, key: &str, wallet: &str, token: &str) -> Answer {
    let feed = Gateway::send(
        client
            .get(format!(
                "{url}/v1/wallets/{wallet}/activities?consistency_token={token}"
            ))
            .bearer_auth(key),
    )
    .await;
    assert_eq!(feed.status, StatusCode::OK, "{feed:?}");
    feed
}

/// Ctrl-C: every process of the cluster stops, Postgres included.
async fn interrupt(mut walletctl: ServiceProcess, data_dir: &std::path::Path) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &walletctl.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(walletctl.wait().await.unwrap().success());
    assert!(
        !data_dir.join("postgres/data/postmaster.pid").exists(),
        "Postgres still runs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn walletctl_up_runs_a_cluster_that_serves_payments_and_resumes_it() {
    let data_dir = integration_tests::process::fresh_data_dir("walletctl-").unwrap();
    let data_dir = data_dir.path();
    // Fixed ports below the ephemeral range, so that port-0 services never take them.
    let base_port = 20_000 + (std::process::id() % 9_000) as u16;
    let walletctl = up(data_dir, base_port).await;
    let url = format!("http://{}", walletctl.address());
    let key = std::fs::read_to_string(data_dir.join("api-key")).unwrap();
    let cluster: Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("cluster.json")).unwrap())
            .unwrap();
    assert_eq!(cluster["gateway_url"], url.as_str());
    // The operator console is served by the cluster.
    let console_url = cluster["console_url"].as_str().unwrap();
    assert_eq!(console_url, format!("{url}/console/"));
    let console = reqwest::get(console_url).await.unwrap();
    assert_eq!(console.status(), StatusCode::OK);
    assert!(console.text().await.unwrap().contains("Operator console"));
    assert_eq!(cluster["api_key"], key.as_str());
    // 3 topology replicas, 2 storage shards and 2 coordinator shards of 3, the query service
    // and the gateway.
    assert_eq!(cluster["processes"].as_array().unwrap().len(), 17);
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
        assert_eq!(balance(&client, &url, &key, wallet, token).await, expected);
    }

    // The audit passes on the healthy cluster (an open hold explains what is pending), and
    // fails once a projected balance is wrong.
    activities(&client, &url, &key, &wallets[1], token).await;
    let hold = post(
        &client,
        &format!("{url}/v1/holds"),
        &key,
        "hold",
        json!({ "wallet_id": wallets[0], "amount": "5.00", "currency": "EUR" }),
    )
    .await;
    assert_eq!(hold["status"], "authorized", "{hold}");

    // Status: every group has a leader and three reachable replicas; the projection has
    // caught up with the payment (the activity read above waited for it).
    let status = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["status", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let groups = status["groups"].as_array().unwrap();
    let kinds: Vec<&str> = groups.iter().map(|g| g["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "topology",
            "storage",
            "storage",
            "coordinator",
            "coordinator"
        ]
    );
    for group in groups {
        assert!(group["leader_node_id"].is_u64(), "{group}");
        let replicas = group["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 3);
        assert!(replicas.iter().all(|r| r["reachable"] == true), "{group}");
    }
    let projected: u64 = groups
        .iter()
        .filter(|g| g["kind"] == "storage")
        .map(|g| g["projection"]["applied_seq"].as_u64().unwrap())
        .sum();
    let payment_seqs: u64 = token
        .split('.')
        .map(|part| part.split_once('-').unwrap().1.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert!(projected >= payment_seqs, "{status}");
    assert!(
        groups
            .iter()
            .filter(|g| g["kind"] == "coordinator")
            .all(|g| g["in_flight"].is_u64()),
        "{status}"
    );

    let audit = || async {
        tokio::process::Command::new(workspace_binary("walletctl"))
            .args(["audit", "--data-dir"])
            .arg(data_dir)
            .output()
            .await
            .unwrap()
    };
    let healthy = audit().await;
    let report = String::from_utf8_lossy(&healthy.stdout).to_string();
    assert!(
        healthy.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    assert_eq!(
        report.matches("ok  ").count(),
        16,
        "6 checks × 2 shards, 2 over all shards, reservations, transactions: {report}"
    );
    let database_url = cluster["database_url"].as_str().unwrap();
    let pool = query::store::connect(database_url).await.unwrap();
    let corrupted = sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE account_id = $1")
        .bind(format!("demo/{}", wallets[1]))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(corrupted.rows_affected(), 1);
    let broken = audit().await;
    let report = String::from_utf8_lossy(&broken.stdout).to_string();
    assert_eq!(broken.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL") && report.contains(&wallets[1]),
        "{report}"
    );
    // A coordinator shard added to the running cluster is supervised and comes back with it.
    let added = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["coordinator", "add", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    assert_eq!(
        String::from_utf8_lossy(&added.stdout).trim(),
        "coordinator shard 3 added"
    );
    let process_count = || deploy::cluster::running(data_dir).unwrap().processes.len();
    assert_eq!(process_count(), 20);
    interrupt(walletctl, data_dir).await;

    // `up` again on the same directory: the same key, the same money.
    let walletctl = up(data_dir, base_port).await;
    let url = format!("http://{}", walletctl.address());
    assert_eq!(
        process_count(),
        20,
        "the added coordinator shard runs again"
    );
    for (wallet, expected) in wallets.iter().zip(["15.00", "10.00"]) {
        assert_eq!(balance(&client, &url, &key, wallet, token).await, expected);
    }
    // The projection resumed from where it was: the feed holds each activity once.
    let hold_token = hold["consistency_token"].as_str().unwrap();
    let feed = activities(&client, &url, &key, &wallets[0], hold_token).await;
    let kinds: Vec<(&str, &str)> = feed.body["activities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["kind"].as_str().unwrap(), a["amount"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("hold", "-5.00"),
            ("payment_sent", "-10.00"),
            ("deposit", "25.00")
        ]
    );

    // A process that dies is restarted: kill -9 a storage replica and the query service.
    let pids = || {
        let cluster: Value =
            serde_json::from_str(&std::fs::read_to_string(data_dir.join("cluster.json")).unwrap())
                .unwrap();
        cluster["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let name = format!("{}-{}-{}", p["role"], p["shard_id"], p["node_id"]);
                (name, p["pid"].as_u64().unwrap())
            })
            .collect::<std::collections::BTreeMap<String, u64>>()
    };
    let before = pids();
    let victims = ["\"storage\"-1-2", "\"query\"-null-null"];
    for victim in victims {
        let status = std::process::Command::new("kill")
            .args(["-9", &before[victim].to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = pids();
        if victims.iter().all(|v| now[*v] != before[*v]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let paid_again = post(
        &client,
        &format!("{url}/v1/payments"),
        &key,
        "pay-after-restarts",
        json!({ "from_wallet_id": wallets[0], "to_wallet_id": wallets[1], "amount": "1.00", "currency": "EUR" }),
    )
    .await;
    assert_eq!(paid_again["status"], "committed", "{paid_again}");
    let token = paid_again["consistency_token"].as_str().unwrap();
    let feed = activities(&client, &url, &key, &wallets[1], token).await;
    assert_eq!(feed.body["activities"][0]["amount"], "1.00", "{feed:?}");

    // A corrupted projection fails the audit; a rebuild in place makes it right again.
    let pool = query::store::connect(cluster["database_url"].as_str().unwrap())
        .await
        .unwrap();
    let corrupted = sqlx::query("UPDATE accounts SET balance = balance - 5 WHERE account_id = $1")
        .bind("demo/sys:funding:EUR")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(corrupted.rows_affected(), 1);
    let walletctl_command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(workspace_binary("walletctl"));
        command.args(args).arg("--data-dir").arg(data_dir);
        command
    };
    let audit = walletctl_command(&["audit"]).output().await.unwrap();
    assert_eq!(audit.status.code(), Some(1), "{audit:?}");
    let rebuilt = walletctl_command(&["rebuild"]).output().await.unwrap();
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    let audit = walletctl_command(&["audit"]).output().await.unwrap();
    assert!(audit.status.success(), "{audit:?}");
    let feed = activities(&client, &url, &key, &wallets[1], token).await;
    let amounts: Vec<&str> = feed.body["activities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["amount"].as_str().unwrap())
        .collect();
    assert_eq!(
        amounts,
        ["1.00", "10.00"],
        "the feed rebuilt, each activity once"
    );

    // API keys: a new one works; revoked, it is refused (within the gateway's key cache time).
    let created = walletctl_command(&["apikey", "create", "--tenant", "demo", "--scopes", "read"])
        .output()
        .await
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let new_key = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    let read = |key: String| {
        let (client, url, wallet) = (client.clone(), url.clone(), wallets[0].clone());
        async move {
            Gateway::send(
                client
                    .get(format!("{url}/v1/wallets/{wallet}/balance"))
                    .bearer_auth(key),
            )
            .await
            .status
        }
    };
    assert_eq!(read(new_key.clone()).await, StatusCode::OK);
    let key_id = new_key.split('_').nth(1).unwrap().to_string();
    let revoked = walletctl_command(&["apikey", "revoke", "--key-id", &key_id])
        .output()
        .await
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while read(new_key.clone()).await != StatusCode::UNAUTHORIZED {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    interrupt(walletctl, data_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn walletctl_up_with_kafka_projects_through_the_broker() {
    let broker = integration_tests::kafka::KafkaBroker::shared().unwrap();
    let data_dir = integration_tests::process::fresh_data_dir("walletctl-kafka-").unwrap();
    let data_dir = data_dir.path();
    let args = [
        "up",
        "--data-dir",
        &data_dir.display().to_string(),
        "--base-port",
        "0",
        "--gateway-addr",
        "127.0.0.1:0",
        "--kafka-brokers",
        broker.bootstrap_servers(),
    ]
    .map(String::from);
    let walletctl = spawn(&workspace_binary("walletctl"), &args).await.unwrap();
    let url = format!("http://{}", walletctl.address());
    let key = std::fs::read_to_string(data_dir.join("api-key")).unwrap();
    let cluster: Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("cluster.json")).unwrap())
            .unwrap();
    let roles: Vec<&str> = cluster["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["role"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"connector"), "{roles:?}");
    let client = Client::new();
    let wallet = post(
        &client,
        &format!("{url}/v1/wallets"),
        &key,
        "create-kafka",
        json!({ "owner_id": "k", "currency": "USD" }),
    )
    .await;
    let wallet = wallet["wallet_id"].as_str().unwrap().to_string();
    let deposited = post(
        &client,
        &format!("{url}/v1/deposits"),
        &key,
        "deposit-kafka",
        json!({ "wallet_id": wallet, "amount": "7.25", "currency": "USD" }),
    )
    .await;
    let token = deposited["consistency_token"].as_str().unwrap();
    let feed = activities(&client, &url, &key, &wallet, token).await;
    assert_eq!(feed.body["activities"][0]["kind"], "deposit", "{feed:?}");
    assert_eq!(feed.body["activities"][0]["amount"], "7.25", "{feed:?}");
    // The events went through the broker: the ledger topic holds them.
    let consumer: rdkafka::consumer::BaseConsumer = broker.client_config().create().unwrap();
    use rdkafka::consumer::Consumer;
    let metadata = consumer
        .fetch_metadata(
            Some(query::LEDGER_TOPIC),
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut messages = 0;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(
                query::LEDGER_TOPIC,
                partition,
                std::time::Duration::from_secs(10),
            )
            .unwrap();
        messages += high - low;
    }
    assert!(
        messages >= 3,
        "{messages} messages in {}",
        query::LEDGER_TOPIC
    );

    // The demo scenario runs against this cluster (twice: every run uses new keys).
    for _ in 0..2 {
        let demo = tokio::process::Command::new(workspace_binary("walletctl"))
            .args(["demo", "--data-dir"])
            .arg(data_dir)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&demo.stdout).to_string();
        assert!(
            demo.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&demo.stderr)
        );
        assert!(
            stdout.contains("overdraft: 422 /problems/insufficient-funds"),
            "{stdout}"
        );
        assert!(
            stdout.contains("holds: 50.00 authorized, 30.00 captured (committed), 20.00 voided"),
            "{stdout}"
        );
        assert!(stdout.contains("money conserved: EUR and USD"), "{stdout}");
        assert!(stdout.contains("  USD team"), "{stdout}");
    }
    interrupt(walletctl, data_dir).await;
}

/// Processes started by something else than `up` (as Kubernetes would): `walletctl bootstrap`
/// initializes every group and fills the topology, and running it again changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn walletctl_bootstrap_initializes_groups_started_elsewhere() {
    let data_dir = integration_tests::process::fresh_data_dir("bootstrap-").unwrap();
    let mut processes = Vec::new();
    let start = |binary: &'static str, name: String, listen: String, args: Vec<String>| {
        let dir = data_dir.path().join(&name);
        async move {
            let mut all = vec![
                "--listen".to_string(),
                listen,
                "--data-dir".into(),
                dir.display().to_string(),
            ];
            all.extend(args);
            spawn(&workspace_binary(binary), &all).await.unwrap()
        }
    };
    let any_port = || "127.0.0.1:0".to_string();
    let mut topology = Vec::new();
    for node in 1..=3 {
        let args = vec!["--node-id".into(), node.to_string()];
        let process = start("marker-topology", format!("t{node}"), any_port(), args).await;
        topology.push(process.address().to_string());
        processes.push(process);
    }
    let args = |group: &str, id: &str, node: u64| {
        vec![
            group.to_string(),
            id.to_string(),
            "--node-id".into(),
            node.to_string(),
            "--topology".into(),
            topology.join(","),
        ]
    };
    let mut storage = Vec::new();
    for node in 1..=3 {
        let process = start(
            "auticuro",
            format!("s{node}"),
            any_port(),
            args("--shard-id", "7", node),
        )
        .await;
        storage.push(process.address().to_string());
        processes.push(process);
    }
    // Coordinators are ready only once the topology lists a storage shard, so their addresses
    // are fixed in advance (as a StatefulSet's are) and bootstrap runs while they start.
    let coordinator: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", integration_tests::free_port().unwrap()))
        .collect();
    let bootstrap = || {
        let mut command = tokio::process::Command::new(workspace_binary("walletctl"));
        command.args([
            "bootstrap",
            "--topology",
            &topology.join(","),
            "--storage-shard",
            &format!("7={}", storage.join(",")),
            "--coordinator-shard",
            &format!("3={}", coordinator.join(",")),
        ]);
        command
    };
    let first = bootstrap().output();
    let coordinators = async {
        let mut started = Vec::new();
        for (node, address) in (1..=3).zip(&coordinator) {
            let args = args("--coordinator-shard-id", "3", node);
            started.push(start("marker", format!("c{node}"), address.clone(), args).await);
        }
        started
    };
    let (first, _coordinators) = tokio::join!(first, coordinators);
    let first = first.unwrap();
    assert!(first.status.success(), "{first:?}");
    let again = bootstrap().output().await.unwrap();
    assert!(again.status.success(), "{again:?}");
    let status = deploy::status::status(&topology, "postgres://nowhere:1/none")
        .await
        .unwrap();
    let groups: Vec<(&str, u32, bool, usize)> = status
        .groups
        .iter()
        .map(|g| {
            let reachable = g.replicas.iter().filter(|r| r.reachable).count();
            (g.kind, g.group_id, g.leader_node_id.is_some(), reachable)
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("topology", 0, true, 3),
            ("storage", 7, true, 3),
            ("coordinator", 3, true, 3)
        ]
    );
    let coordinator_status = status.groups.last().unwrap();
    assert_eq!(coordinator_status.in_flight, Some(0));
}

/// Posts until the answer is final (201), retrying "pending" (202) and "unavailable" (503)
/// answers with the same idempotency key, as a careful client does.
async fn post_until_final(
    client: &Client,
    url: &str,
    key: &str,
    idempotency_key: &str,
    body: Value,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let answer = Gateway::send(
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", idempotency_key)
                .json(&body),
        )
        .await;
        match answer.status {
            StatusCode::CREATED => return answer.body,
            StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            _ => panic!("{idempotency_key}: {answer:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn walletctl_coordinator_drain_under_load_fails_and_doubles_no_payment() {
    const PER_WORKER: usize = 25;
    let data_dir = integration_tests::process::fresh_data_dir("walletctl-drain-").unwrap();
    let data_dir = data_dir.path();
    let walletctl = up(data_dir, 0).await;
    let url = format!("http://{}", walletctl.address());
    let key = std::fs::read_to_string(data_dir.join("api-key")).unwrap();
    let client = Client::new();
    let mut wallets = Vec::new();
    for n in 0..4 {
        let wallet = post(
            &client,
            &format!("{url}/v1/wallets"),
            &key,
            &format!("drain-wallet-{n}"),
            json!({ "owner_id": format!("o{n}"), "currency": "USD" }),
        )
        .await;
        let wallet = wallet["wallet_id"].as_str().unwrap().to_string();
        post(
            &client,
            &format!("{url}/v1/deposits"),
            &key,
            &format!("drain-deposit-{n}"),
            json!({ "wallet_id": wallet, "amount": "100.00", "currency": "USD" }),
        )
        .await;
        wallets.push(wallet);
    }
    // A third coordinator shard joins before the load: new transactions spread over three.
    let added = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["coordinator", "add", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for worker in 0..4usize {
        let (client, url, key, wallets, done) = (
            client.clone(),
            url.clone(),
            key.clone(),
            wallets.clone(),
            done.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for n in 0..PER_WORKER {
                let (from, to) = (&wallets[worker], &wallets[(worker + 1 + n % 3) % 4]);
                let paid = post_until_final(
                    &client,
                    &format!("{url}/v1/payments"),
                    &key,
                    &format!("drain-pay-{worker}-{n}"),
                    json!({ "from_wallet_id": from, "to_wallet_id": to, "amount": "1.00", "currency": "USD" }),
                )
                .await;
                assert_eq!(paid["status"], "committed", "{paid}");
                tokens.push(paid["consistency_token"].as_str().unwrap().to_string());
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tokens
        }));
    }
    while done.load(std::sync::atomic::Ordering::Relaxed) < 8 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let drained = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["coordinator", "drain", "--id", "1", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(drained.status.success(), "{drained:?}");
    let mut tokens = Vec::new();
    for worker in workers {
        tokens.extend(worker.await.unwrap());
    }
    assert_eq!(tokens.len(), 4 * PER_WORKER, "every payment committed");
    let cluster = deploy::cluster::running(data_dir).unwrap();
    let topology = marker::topology::TopologyClient::new(cluster.topology.clone())
        .get()
        .await
        .unwrap();
    assert_eq!(
        topology.coordinators[&1].state,
        marker::topology::CoordinatorState::Removed
    );
    // The drained shard's processes can go; an active one cannot.
    let operator = |args: &[&str]| {
        let mut command = tokio::process::Command::new(workspace_binary("walletctl"));
        command.args(args).arg("--data-dir").arg(data_dir);
        command
    };
    let before = deploy::cluster::running(data_dir).unwrap().processes.len();
    let refused = operator(&["coordinator", "remove", "--id", "2"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not drained"),
        "{refused:?}"
    );
    let removed = operator(&["coordinator", "remove", "--id", "1"])
        .output()
        .await
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let after = deploy::cluster::running(data_dir).unwrap();
    assert_eq!(after.processes.len(), before - 3);
    assert!(
        !after
            .processes
            .iter()
            .any(|p| p.role == "coordinator" && p.shard_id == Some(1))
    );
    let third = marker::status::in_flight(&topology.coordinators[&3].replicas).await;
    assert_eq!(
        third,
        Some(0),
        "the added shard answers and has finished its work"
    );
    let status = deploy::status::status(&cluster.topology, &cluster.database_url)
        .await
        .unwrap();
    let third_applied = status
        .groups
        .iter()
        .find(|g| g.kind == "coordinator" && g.group_id == 3)
        .map(|g| g.applied_seq)
        .unwrap();
    assert!(third_applied > 0, "the added shard took transactions");
    // Each payment moved money once: every wallet paid PER_WORKER dollars and received what
    // was sent to it.
    let mut expected = [10_000i64; 4];
    for worker in 0..4usize {
        for n in 0..PER_WORKER {
            expected[worker] -= 100;
            expected[(worker + 1 + n % 3) % 4] += 100;
        }
    }
    let last = tokens.last().unwrap().clone();
    for (wallet, cents) in wallets.iter().zip(expected) {
        let answer = balance(&client, &url, &key, wallet, &last).await;
        let shown: f64 = answer.as_str().unwrap().parse().unwrap();
        assert_eq!((shown * 100.0).round() as i64, cents, "{wallet}");
    }
    let audit = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["audit", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(audit.status.success(), "{audit:?}");
    interrupt(walletctl, data_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn walletctl_bench_runs_a_benchmark_and_prints_one_table_and_json() {
    let output = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["bench", "--workloads", "query", "--"])
        .args(["--seconds", "1", "--rate", "200", "--accounts", "10"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("query        commit to visible"),
        "{stdout}"
    );
    let json: Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(json["query"]["benchmark"], "query");
    assert!(
        json["query"]["lag"]["operations"].as_u64().unwrap() > 0,
        "{json}"
    );
    let unknown = tokio::process::Command::new(workspace_binary("walletctl"))
        .args(["bench", "--workloads", "nothing"])
        .output()
        .await
        .unwrap();
    assert!(!unknown.status.success());
}

/// A storage replica is added (it catches up, then votes) and another removed, and the topology
/// follows, while payments keep working.
#[tokio::test(flavor = "multi_thread")]
async fn walletctl_shard_adds_and_removes_replicas_and_the_topology_follows() {
    use integration_tests::platform::{Platform, leg};
    let mut platform = Platform::start_with_topology(1).await;
    let topology = platform.topology.as_ref().unwrap().addresses();
    let alice = platform.open(1, "r-alice", 1_000).await;
    let bob = platform.open(2, "r-bob", 0).await;
    let new_address = platform.storage[0]
        .add_process(4)
        .await
        .unwrap()
        .address
        .clone();
    let walletctl = |args: &[&str]| {
        let mut command = tokio::process::Command::new(workspace_binary("walletctl"));
        command
            .args(["shard"])
            .args(args)
            .args(["--topology", &topology]);
        command
    };
    let added = walletctl(&[
        "add-replica",
        "--shard",
        "1",
        "--node-id",
        "4",
        "--address",
        &new_address,
    ])
    .output()
    .await
    .unwrap();
    assert!(added.status.success(), "{added:?}");
    let voters = |status: proto::raft::v1::StatusResponse| -> Vec<u64> {
        status
            .membership
            .unwrap()
            .voters
            .iter()
            .map(|n| n.node_id)
            .collect()
    };
    assert_eq!(
        voters(platform.storage[0].status(4).await.unwrap()),
        [1, 2, 3, 4]
    );
    let removed = walletctl(&["remove-replica", "--shard", "1", "--node-id", "2"])
        .output()
        .await
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let removed_address = platform.storage[0].address_of(2).to_string();
    platform.storage[0].kill(2).await.unwrap();
    assert_eq!(
        voters(platform.storage[0].status(4).await.unwrap()),
        [1, 3, 4]
    );
    let listed =
        marker::topology::TopologyClient::new(topology.split(',').map(String::from).collect())
            .get()
            .await
            .unwrap()
            .storage_shards[&1]
            .clone();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.contains(&new_address) && !listed.contains(&removed_address));
    let paid = platform
        .pay(
            "after-membership-change",
            vec![leg(&alice, -10), leg(&bob, 10)],
        )
        .await;
    assert_eq!(
        paid.status,
        proto::marker::v1::TransactionStatus::Committed as i32
    );
    // The new replica has every event, up to the payment's post.
    let shard = &platform.storage[0];
    let leader_seq = shard
        .status(shard.leader().await.unwrap())
        .await
        .unwrap()
        .applied_seq;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shard.status(4).await.unwrap().applied_seq < leader_seq {
        assert!(std::time::Instant::now() < deadline, "the new replica lags");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
