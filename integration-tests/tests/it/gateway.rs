//! The access gateway through real HTTP against a real cluster: topology, two storage shards and
//! a coordinator shard of three replicas each, the gateway process and its Postgres database.

use std::collections::BTreeMap;

use auticuro::ledger::AccountId;
use integration_tests::gateway::{Answer, Gateway};
use integration_tests::platform::Platform;
use reqwest::{Method, StatusCode};
use serde_json::json;

const TENANT: &str = "acme";

async fn start() -> (Platform, Gateway) {
    let platform = Platform::start_with_topology(1).await;
    let gateway = Gateway::start(&platform).await.unwrap();
    (platform, gateway)
}

fn shard_of(tenant: &str, wallet_id: &str) -> u32 {
    let account = AccountId::parse(&format!("{tenant}/{wallet_id}")).unwrap();
    auticuro::routing::SlotTable::uniform(&[1, 2]).shard_of(&account)
}

/// A new USD wallet of `tenant` on storage shard `shard_id`.
async fn wallet_on(
    gateway: &Gateway,
    key: &str,
    tenant: &str,
    shard_id: u32,
    name: &str,
) -> String {
    for attempt in 0..64 {
        let created = gateway
            .post(
                "/v1/wallets",
                key,
                &format!("create-{name}-{attempt}"),
                json!({ "owner_id": format!("owner-{name}"), "currency": "USD" }),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        let wallet_id = created.text("wallet_id");
        if shard_of(tenant, &wallet_id) == shard_id {
            return wallet_id;
        }
    }
    panic!("no wallet landed on shard {shard_id}");
}

async fn available(gateway: &Gateway, key: &str, wallet_id: &str, token: Option<&str>) -> String {
    let path = match token {
        Some(token) => format!("/v1/wallets/{wallet_id}/balance?consistency_token={token}"),
        None => format!("/v1/wallets/{wallet_id}/balance"),
    };
    let balance = gateway.get(&path, key).await;
    assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    balance.text("available")
}

async fn deposit(gateway: &Gateway, key: &str, wallet_id: &str, amount: &str) -> Answer {
    gateway
        .post(
            "/v1/deposits",
            key,
            &format!("deposit-{wallet_id}-{amount}"),
            json!({ "wallet_id": wallet_id, "amount": amount, "currency": "USD" }),
        )
        .await
}

/// Once nothing is in flight: on every shard, per currency, the balances sum to zero and
/// nothing is left pending.
async fn assert_money_conserved(platform: &Platform) {
    assert_eq!(
        platform.in_flight_when_settled().await,
        0,
        "transactions left in flight"
    );
    for shard in &platform.storage {
        let mut sums: BTreeMap<String, i128> = BTreeMap::new();
        for account in shard.accounts().await.unwrap().values() {
            *sums.entry(account.currency.clone()).or_default() +=
                integration_tests::platform::minor(&account.balance);
            assert_eq!(integration_tests::platform::minor(&account.pending_out), 0);
            assert_eq!(integration_tests::platform::minor(&account.pending_in), 0);
        }
        assert!(
            sums.values().all(|sum| *sum == 0),
            "shard {}: {sums:?}",
            shard.shard_id
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_works_through_http() {
    let (platform, gateway) = start().await;
    let key = gateway.create_key(TENANT, "read,write").await.unwrap();
    let alice = wallet_on(&gateway, &key, TENANT, 1, "alice").await;
    let bob = wallet_on(&gateway, &key, TENANT, 2, "bob").await;

    let wallet = gateway.get(&format!("/v1/wallets/{alice}"), &key).await;
    assert_eq!(wallet.status, StatusCode::OK, "{wallet:?}");
    assert_eq!(wallet.text("owner_id"), "owner-alice");
    assert_eq!(wallet.text("state"), "active");
    assert_eq!(wallet.text("balance"), "0.00");

    // Deposit, then read it back with the write's consistency token.
    let deposited = deposit(&gateway, &key, &alice, "100.00").await;
    assert_eq!(deposited.status, StatusCode::CREATED, "{deposited:?}");
    assert_eq!(deposited.text("status"), "committed");
    assert_eq!(deposited.text("kind"), "deposit");
    let token = deposited.text("consistency_token");
    assert_eq!(
        available(&gateway, &key, &alice, Some(&token)).await,
        "100.00"
    );

    // A cross-shard payment with a fee.
    let paid = gateway
        .post(
            "/v1/payments",
            &key,
            "pay-1",
            json!({
                "from_wallet_id": alice, "to_wallet_id": bob, "amount": "30.00",
                "currency": "USD", "fee": { "amount": "1.50" }, "metadata": { "order": "42" }
            }),
        )
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{paid:?}");
    assert_eq!(paid.text("status"), "committed");
    let legs: Vec<(String, String)> = paid.body["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|leg| {
            (
                leg["account"].as_str().unwrap().into(),
                leg["amount"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(legs.contains(&(alice.clone(), "-31.50".into())), "{legs:?}");
    assert!(legs.contains(&(bob.clone(), "30.00".into())), "{legs:?}");
    assert!(
        legs.contains(&("sys:fees:USD".into(), "1.50".into())),
        "{legs:?}"
    );
    assert_eq!(paid.body["metadata"]["order"], "42");
    let token = paid.text("consistency_token");
    assert_eq!(
        available(&gateway, &key, &alice, Some(&token)).await,
        "68.50"
    );
    assert_eq!(available(&gateway, &key, &bob, Some(&token)).await, "30.00");

    // The transaction, and its status changes as server-sent events.
    let transaction_id = paid.text("transaction_id");
    let fetched = gateway
        .get(&format!("/v1/transactions/{transaction_id}"), &key)
        .await;
    assert_eq!(fetched.status, StatusCode::OK, "{fetched:?}");
    assert_eq!(fetched.text("status"), "committed");
    assert_eq!(fetched.text("kind"), "payment");
    let events = gateway
        .request(
            Method::GET,
            &format!("/v1/transactions/{transaction_id}/events"),
            &key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // The stream ends once the transaction is done.
    let text = tokio::time::timeout(std::time::Duration::from_secs(20), events.text())
        .await
        .expect("the event stream ends when the transaction is done")
        .unwrap();
    assert!(text.contains("event: status"), "{text}");
    assert!(text.contains("\"status\":\"committed\""), "{text}");
    assert!(text.contains("\"done\":true"), "{text}");

    // A withdrawal.
    let withdrawn = gateway
        .post(
            "/v1/withdrawals",
            &key,
            "withdraw-1",
            json!({ "wallet_id": bob, "amount": "10", "currency": "USD", "reference": "bank-77" }),
        )
        .await;
    assert_eq!(withdrawn.status, StatusCode::CREATED, "{withdrawn:?}");
    assert_eq!(withdrawn.body["metadata"]["reference"], "bank-77");
    let token = withdrawn.text("consistency_token");
    assert_eq!(available(&gateway, &key, &bob, Some(&token)).await, "20.00");

    // The activity feeds, read with the writes' tokens, newest first.
    let feed = |wallet: &str, query: &str| {
        let path = format!("/v1/wallets/{wallet}/activities?{query}");
        let (gateway, key) = (&gateway, &key);
        async move { gateway.get(&path, key).await }
    };
    let entries = |answer: &Answer| -> Vec<(String, String, String)> {
        answer.body["activities"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer:?}"))
            .iter()
            .map(|a| {
                (
                    a["kind"].as_str().unwrap().to_string(),
                    a["amount"].as_str().unwrap().to_string(),
                    a["counterparty"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let bobs = feed(&bob, &format!("consistency_token={token}")).await;
    assert_eq!(bobs.status, StatusCode::OK, "{bobs:?}");
    assert_eq!(
        entries(&bobs),
        vec![
            (
                "withdrawal".into(),
                "-10.00".into(),
                "sys:funding:USD".into()
            ),
            ("payment_received".into(), "30.00".into(), alice.clone()),
        ]
    );
    assert_eq!(
        bobs.body["activities"][1]["transaction_id"],
        transaction_id.as_str()
    );
    assert_eq!(bobs.body["activities"][1]["metadata"]["order"], "42");
    let paid_token = paid.text("consistency_token");
    let mut alices = Vec::new();
    let mut page = format!("consistency_token={paid_token}&page_size=1");
    loop {
        let answer = feed(&alice, &page).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        alices.extend(entries(&answer));
        match answer.body["next_page_token"].as_str() {
            Some(next) => page = format!("page_size=1&page_token={next}"),
            None => break,
        }
    }
    assert_eq!(
        alices,
        vec![
            ("fee".into(), "-1.50".into(), "sys:fees:USD".into()),
            ("payment_sent".into(), "-30.00".into(), bob.clone()),
            ("deposit".into(), "100.00".into(), "sys:funding:USD".into()),
        ]
    );
    assert_eq!(
        feed(&alice, "page_size=0").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        feed(&alice, "page_token=x").await.status,
        StatusCode::BAD_REQUEST
    );
    let stranger = gateway.create_key("other-tenant", "read").await.unwrap();
    let foreign = gateway
        .get(&format!("/v1/wallets/{alice}/activities"), &stranger)
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");

    // Business rejections are typed problems and move nothing.
    let too_much = gateway
        .post(
            "/v1/payments",
            &key,
            "pay-too-much",
            json!({ "from_wallet_id": bob, "to_wallet_id": alice, "amount": "20.01", "currency": "USD" }),
        )
        .await;
    assert_eq!(
        too_much.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{too_much:?}"
    );
    assert_eq!(too_much.problem_type(), "/problems/insufficient-funds");
    assert_eq!(too_much.headers["content-type"], "application/problem+json");
    assert!(too_much.body["transaction_id"].is_string());
    let wrong_currency = gateway
        .post(
            "/v1/deposits",
            &key,
            "deposit-eur",
            json!({ "wallet_id": bob, "amount": "1", "currency": "EUR" }),
        )
        .await;
    assert_eq!(
        wrong_currency.problem_type(),
        "/problems/currency-mismatch",
        "{wrong_currency:?}"
    );

    // Freeze stops money; unfreeze lets it move again.
    let frozen = gateway
        .post(
            &format!("/v1/wallets/{bob}/freeze"),
            &key,
            "freeze-bob",
            json!(null),
        )
        .await;
    assert_eq!(frozen.status, StatusCode::OK, "{frozen:?}");
    assert_eq!(frozen.text("state"), "frozen");
    let to_frozen = gateway
        .post(
            "/v1/payments",
            &key,
            "pay-frozen",
            json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": "1", "currency": "USD" }),
        )
        .await;
    assert_eq!(
        to_frozen.problem_type(),
        "/problems/wallet-frozen",
        "{to_frozen:?}"
    );
    let unfrozen = gateway
        .post(
            &format!("/v1/wallets/{bob}/unfreeze"),
            &key,
            "unfreeze-bob",
            json!(null),
        )
        .await;
    assert_eq!(unfrozen.text("state"), "active", "{unfrozen:?}");

    // Close: refused while money is in the wallet, done once it is empty.
    let refused = gateway
        .post(
            &format!("/v1/wallets/{bob}/close"),
            &key,
            "close-bob-1",
            json!(null),
        )
        .await;
    assert_eq!(
        refused.problem_type(),
        "/problems/wallet-not-empty",
        "{refused:?}"
    );
    let emptied = gateway
        .post(
            "/v1/withdrawals",
            &key,
            "withdraw-all",
            json!({ "wallet_id": bob, "amount": "20.00", "currency": "USD" }),
        )
        .await;
    assert_eq!(emptied.status, StatusCode::CREATED, "{emptied:?}");
    let closed = gateway
        .post(
            &format!("/v1/wallets/{bob}/close"),
            &key,
            "close-bob-2",
            json!(null),
        )
        .await;
    assert_eq!(closed.status, StatusCode::OK, "{closed:?}");
    assert_eq!(closed.text("state"), "closed");

    // Operations endpoints and the API description.
    assert_eq!(gateway.get("/healthz", "").await.status, StatusCode::OK);
    assert_eq!(gateway.get("/readyz", "").await.status, StatusCode::OK);
    let openapi = gateway.get("/openapi.json", "").await;
    assert_eq!(
        openapi.body["openapi"].as_str().unwrap().get(..3),
        Some("3.1")
    );
    for path in [
        "/v1/wallets",
        "/v1/payments",
        "/v1/deposits",
        "/v1/withdrawals",
        "/v1/holds",
        "/v1/holds/{hold_id}/capture",
        "/v1/transactions/{transaction_id}",
    ] {
        assert!(openapi.body["paths"][path].is_object(), "{path} missing");
    }
    let docs = gateway.get("/docs/", "").await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(
        docs.body.as_str().unwrap_or("").contains("swagger"),
        "{docs:?}"
    );
    let metrics = gateway.get("/metrics", "").await;
    let metrics = metrics.body.as_str().unwrap_or("");
    assert!(
        metrics.contains("gateway_http_requests_total{route=\"/v1/payments\""),
        "{metrics}"
    );

    assert_money_conserved(&platform).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_problems_and_changes_nothing() {
    let (platform, gateway) = start().await;
    let key = gateway.create_key(TENANT, "read,write").await.unwrap();
    let alice = wallet_on(&gateway, &key, TENANT, 1, "alice").await;
    let bob = wallet_on(&gateway, &key, TENANT, 2, "bob").await;
    assert_eq!(
        deposit(&gateway, &key, &alice, "10.00").await.status,
        StatusCode::CREATED
    );
    let payment = |amount: &str| json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": amount, "currency": "USD" });
    let invalid_amounts = [
        "1.234",
        "0",
        "0.00",
        "-5",
        "abc",
        "1e3",
        "",
        " 1",
        "99999999999999999999999",
    ];
    for (index, amount) in invalid_amounts.iter().enumerate() {
        let answer = gateway
            .post(
                "/v1/payments",
                &key,
                &format!("bad-{index}"),
                payment(amount),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{amount:?}: {answer:?}"
        );
        assert_eq!(answer.problem_type(), "/problems/invalid-request");
    }
    let mut unknown_field = payment("1.00");
    unknown_field["surprise"] = json!(true);
    let cases = [
        ("unknown field", unknown_field),
        (
            "unknown currency",
            json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": "1", "currency": "XXX" }),
        ),
        (
            "missing field",
            json!({ "from_wallet_id": alice, "amount": "1", "currency": "USD" }),
        ),
        (
            "wrong type",
            json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": 1, "currency": "USD" }),
        ),
        (
            "same wallet",
            json!({ "from_wallet_id": alice, "to_wallet_id": alice, "amount": "1", "currency": "USD" }),
        ),
        (
            "reserved metadata",
            json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": "1", "currency": "USD", "metadata": { "wallet:kind": "x" } }),
        ),
    ];
    for (index, (what, body)) in cases.into_iter().enumerate() {
        let answer = gateway
            .post("/v1/payments", &key, &format!("case-{index}"), body)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {answer:?}");
        assert!(answer.body["detail"].is_string(), "{what}: {answer:?}");
    }
    let malformed = Gateway::send(
        gateway
            .request(Method::POST, "/v1/payments", &key)
            .header("Idempotency-Key", "malformed")
            .header("content-type", "application/json")
            .body("{\"from_wallet_id\": "),
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST, "{malformed:?}");
    // A body declared far above the 16 KiB limit is refused from its headers, before it is
    // read. (Sent over a raw connection without the body: a client still writing a body the
    // server refuses races the server's close and may see a reset instead of the answer.)
    let huge = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = gateway.url.trim_start_matches("http://");
        let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /v1/payments HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\n\
             idempotency-key: huge\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            200 * 1024
        );
        connection.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                connection.read(&mut buffer),
            )
            .await
            .expect("the gateway answers without the body")
            .unwrap();
            assert!(read > 0, "closed without an answer");
            answer.extend_from_slice(&buffer[..read]);
        }
        String::from_utf8_lossy(&answer).to_string()
    };
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    assert!(huge.contains("application/problem+json"), "{huge}");
    let no_key = Gateway::send(
        gateway
            .request(Method::POST, "/v1/payments", &key)
            .json(&payment("1")),
    )
    .await;
    assert_eq!(no_key.status, StatusCode::BAD_REQUEST, "{no_key:?}");
    let unauthenticated = gateway
        .post("/v1/payments", "wk_nope_nope", "k", payment("1"))
        .await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let unknown_path = gateway.get("/v1/nothing-here", &key).await;
    assert_eq!(unknown_path.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown_path.problem_type(), "/problems/not-found");

    assert_eq!(available(&gateway, &key, &alice, None).await, "10.00");
    assert_eq!(available(&gateway, &key, &bob, None).await, "0.00");
    assert_money_conserved(&platform).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_authorize_then_capture_part_or_all_or_void() {
    let (platform, gateway) = start().await;
    let key = gateway.create_key(TENANT, "read,write").await.unwrap();
    let alice = wallet_on(&gateway, &key, TENANT, 1, "alice").await;
    let bob = wallet_on(&gateway, &key, TENANT, 2, "bob").await;
    let carol = wallet_on(&gateway, &key, TENANT, 1, "carol").await;
    assert_eq!(
        deposit(&gateway, &key, &alice, "100.00").await.status,
        StatusCode::CREATED
    );
    let place = |idempotency_key: &'static str, amount: &str| {
        let body = json!({ "wallet_id": alice, "amount": amount, "currency": "USD" });
        let (gateway, key) = (&gateway, &key);
        async move { gateway.post("/v1/holds", key, idempotency_key, body).await }
    };
    let capture = |idempotency_key: &'static str, hold_id: &str, body: serde_json::Value| {
        let path = format!("/v1/holds/{hold_id}/capture");
        let (gateway, key) = (&gateway, &key);
        async move { gateway.post(&path, key, idempotency_key, body).await }
    };
    let funds = |token: String| {
        let (gateway, key, alice) = (&gateway, &key, &alice);
        async move {
            let path = format!("/v1/wallets/{alice}/balance?consistency_token={token}");
            let answer = gateway.get(&path, key).await;
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            (
                answer.text("balance"),
                answer.text("available"),
                answer.text("pending_out"),
            )
        }
    };
    let hold_of = |hold_id: String| {
        let (gateway, key) = (&gateway, &key);
        async move { gateway.get(&format!("/v1/holds/{hold_id}"), key).await }
    };

    // Authorize: the money leaves `available`, not the balance.
    let held = place("hold-1", "60.00").await;
    assert_eq!(held.status, StatusCode::CREATED, "{held:?}");
    assert_eq!(held.text("status"), "authorized");
    assert_eq!(held.text("amount"), "60.00");
    assert_eq!(held.text("wallet_id"), alice);
    let first = held.text("hold_id");
    assert_eq!(
        funds(held.text("consistency_token")).await,
        ("100.00".into(), "40.00".into(), "60.00".into())
    );
    let replayed = place("hold-1", "60.00").await;
    assert_eq!(replayed.text("hold_id"), first);
    assert_eq!(replayed.headers["idempotent-replayed"], "true");
    assert_eq!(place("hold-1", "61.00").await.status, StatusCode::CONFLICT);
    let too_much = place("hold-too-much", "40.01").await;
    assert_eq!(
        too_much.problem_type(),
        "/problems/insufficient-funds",
        "{too_much:?}"
    );
    assert_eq!(hold_of(first.clone()).await.text("status"), "authorized");

    // Capture part of it across shards: the rest is released.
    let captured = capture(
        "capture-1",
        &first,
        json!({ "to_wallet_id": bob, "amount": "45.00" }),
    )
    .await;
    assert_eq!(captured.status, StatusCode::CREATED, "{captured:?}");
    assert_eq!(captured.text("kind"), "capture");
    assert_eq!(captured.text("status"), "committed");
    assert_eq!(
        funds(captured.text("consistency_token")).await,
        ("55.00".into(), "55.00".into(), "0.00".into())
    );
    assert_eq!(
        available(
            &gateway,
            &key,
            &bob,
            Some(&captured.text("consistency_token"))
        )
        .await,
        "45.00"
    );
    let after = hold_of(first.clone()).await;
    assert_eq!(after.text("status"), "captured", "{after:?}");
    assert_eq!(after.text("captured_amount"), "45.00");
    assert_eq!(
        after.text("capture_transaction_id"),
        captured.text("transaction_id")
    );
    let again = capture("capture-again", &first, json!({ "to_wallet_id": bob })).await;
    assert_eq!(again.problem_type(), "/problems/hold-not-open", "{again:?}");
    let void_captured = gateway
        .post(
            &format!("/v1/holds/{first}/void"),
            &key,
            "void-captured",
            json!(null),
        )
        .await;
    assert_eq!(
        void_captured.problem_type(),
        "/problems/hold-not-open",
        "{void_captured:?}"
    );

    // More than the hold is refused and leaves it authorized; then all of it, on one shard.
    let second = place("hold-2", "20.00").await.text("hold_id");
    let exceeded = capture(
        "capture-2-exceeded",
        &second,
        json!({ "to_wallet_id": bob, "amount": "20.01" }),
    )
    .await;
    assert_eq!(
        exceeded.problem_type(),
        "/problems/hold-exceeded",
        "{exceeded:?}"
    );
    assert_eq!(hold_of(second.clone()).await.text("status"), "authorized");
    let to_itself = capture("capture-2-self", &second, json!({ "to_wallet_id": alice })).await;
    assert_eq!(to_itself.status, StatusCode::BAD_REQUEST, "{to_itself:?}");
    let whole = capture("capture-2", &second, json!({ "to_wallet_id": carol })).await;
    assert_eq!(whole.status, StatusCode::CREATED, "{whole:?}");
    assert_eq!(
        funds(whole.text("consistency_token")).await,
        ("35.00".into(), "35.00".into(), "0.00".into())
    );
    assert_eq!(
        hold_of(second.clone()).await.text("captured_amount"),
        "20.00"
    );

    // Void: all of it is available again, once.
    let third = place("hold-3", "10.00").await.text("hold_id");
    let voided = gateway
        .post(
            &format!("/v1/holds/{third}/void"),
            &key,
            "void-3",
            json!(null),
        )
        .await;
    assert_eq!(voided.status, StatusCode::OK, "{voided:?}");
    assert_eq!(voided.text("status"), "voided");
    let token = voided.text("consistency_token");
    assert_eq!(
        funds(token.clone()).await,
        ("35.00".into(), "35.00".into(), "0.00".into())
    );
    let twice = gateway
        .post(
            &format!("/v1/holds/{third}/void"),
            &key,
            "void-3-again",
            json!(null),
        )
        .await;
    assert_eq!(twice.problem_type(), "/problems/hold-not-open", "{twice:?}");

    // The feed tells the story, newest first.
    let feed = gateway
        .get(
            &format!("/v1/wallets/{alice}/activities?consistency_token={token}"),
            &key,
        )
        .await;
    assert_eq!(feed.status, StatusCode::OK, "{feed:?}");
    let kinds: Vec<(String, String)> = feed.body["activities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().into(),
                a["amount"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected = [
        ("void", "10.00"),
        ("hold", "-10.00"),
        ("capture", "-20.00"),
        ("hold", "-20.00"),
        ("capture", "-45.00"),
        ("hold", "-60.00"),
        ("deposit", "100.00"),
    ];
    assert_eq!(
        kinds,
        expected
            .map(|(k, a)| (k.to_string(), a.to_string()))
            .to_vec()
    );

    // Another tenant cannot see, capture or void these holds, nor hold on these wallets.
    let stranger = gateway.create_key("globex", "read,write").await.unwrap();
    let unknown_hold = format!("hold_{}", "0".repeat(64));
    for hold_id in [first.as_str(), second.as_str(), unknown_hold.as_str()] {
        let seen = gateway
            .get(&format!("/v1/holds/{hold_id}"), &stranger)
            .await;
        assert_eq!(seen.problem_type(), "/problems/hold-not-found", "{seen:?}");
        for (action, body) in [
            ("capture", json!({ "to_wallet_id": bob })),
            ("void", json!(null)),
        ] {
            let path = format!("/v1/holds/{hold_id}/{action}");
            let answer = gateway
                .post(&path, &stranger, &format!("steal-{action}-{hold_id}"), body)
                .await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {answer:?}");
        }
    }
    let foreign_hold = gateway
        .post(
            "/v1/holds",
            &stranger,
            "steal-hold",
            json!({ "wallet_id": alice, "amount": "1.00", "currency": "USD" }),
        )
        .await;
    assert_eq!(
        foreign_hold.problem_type(),
        "/problems/wallet-not-found",
        "{foreign_hold:?}"
    );
    assert_eq!(available(&gateway, &key, &alice, None).await, "35.00");

    assert_money_conserved(&platform).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_see_in_flight_payments_and_retry_or_abort_them() {
    let mut platform =
        Platform::start_with_topology_and(1, &["--reserve-timeout-ms", "60000"]).await;
    let gateway = Gateway::start(&platform).await.unwrap();
    let admin = gateway.create_key(TENANT, "admin").await.unwrap();
    let reader = gateway.create_key(TENANT, "read").await.unwrap();
    let alice = wallet_on(&gateway, &admin, TENANT, 1, "alice").await;
    let bob = wallet_on(&gateway, &admin, TENANT, 2, "bob").await;
    let deposited = deposit(&gateway, &admin, &alice, "100.00").await;
    assert_eq!(deposited.status, StatusCode::CREATED, "{deposited:?}");

    // The credit shard goes down: a payment waits in flight, undecided.
    for node_id in 1..=3 {
        platform.storage[1].kill(node_id).await.unwrap();
    }
    let pending = gateway
        .post(
            "/v1/payments",
            &admin,
            "stuck",
            json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": "10.00", "currency": "USD" }),
        )
        .await;
    assert_eq!(pending.status, StatusCode::ACCEPTED, "{pending:?}");
    let stuck = pending.text("transaction_id");
    let listed = gateway.get("/v1/admin/in-flight", &reader).await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let entries = listed.body["transactions"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 1, "{listed:?}");
    assert_eq!(entries[0]["transaction"]["transaction_id"], stuck.as_str());
    assert_eq!(entries[0]["transaction"]["status"], "pending");
    assert!(entries[0]["age_ms"].as_i64().unwrap() >= 0);
    let stranger = gateway.create_key("globex", "admin").await.unwrap();
    let theirs = gateway.get("/v1/admin/in-flight", &stranger).await;
    assert_eq!(theirs.body["transactions"], json!([]), "{theirs:?}");
    let path = |action: &str, id: &str| format!("/v1/admin/transactions/{id}/{action}");
    let foreign = gateway
        .post(
            &path("abort", &stuck),
            &stranger,
            "steal-abort",
            json!(null),
        )
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    let not_admin = gateway
        .post(&path("retry", &stuck), &reader, "reader-retry", json!(null))
        .await;
    assert_eq!(not_admin.status, StatusCode::FORBIDDEN, "{not_admin:?}");

    // Retry now keeps it pending; a forced abort decides it; a decided one cannot be aborted.
    let retried = gateway
        .post(&path("retry", &stuck), &admin, "retry-1", json!(null))
        .await;
    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert_eq!(retried.text("status"), "pending");
    let aborted = gateway
        .post(&path("abort", &stuck), &admin, "abort-1", json!(null))
        .await;
    assert_eq!(aborted.status, StatusCode::OK, "{aborted:?}");
    assert_eq!(aborted.text("status"), "aborted");
    let committed = deposited.text("transaction_id");
    let refused = gateway
        .post(&path("abort", &committed), &admin, "abort-2", json!(null))
        .await;
    assert_eq!(
        refused.problem_type(),
        "/problems/already-decided",
        "{refused:?}"
    );

    // The shard returns: the abort settles there too, and nothing moved.
    for node_id in 1..=3 {
        platform.storage[1].restart(node_id).await.unwrap();
    }
    let mut left = usize::MAX;
    for _ in 0..300 {
        let listed = gateway.get("/v1/admin/in-flight", &admin).await;
        left = listed.body["transactions"]
            .as_array()
            .map_or(usize::MAX, Vec::len);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the aborted payment never settled");
    assert_eq!(available(&gateway, &admin, &alice, None).await, "100.00");
    assert_money_conserved(&platform).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_cannot_see_or_move_each_others_wallets() {
    let (platform, gateway) = start().await;
    let acme = gateway.create_key("acme", "read,write").await.unwrap();
    let globex = gateway.create_key("globex", "read,write").await.unwrap();
    let acme_wallet = wallet_on(&gateway, &acme, "acme", 1, "a").await;
    let globex_wallet = wallet_on(&gateway, &globex, "globex", 2, "g").await;
    let deposited = deposit(&gateway, &globex, &globex_wallet, "50.00").await;
    assert_eq!(deposited.status, StatusCode::CREATED);
    // Acme's wallet has money, so the only thing wrong below is the other wallet.
    assert_eq!(
        deposit(&gateway, &acme, &acme_wallet, "50.00").await.status,
        StatusCode::CREATED
    );
    let globex_transaction = deposited.text("transaction_id");

    // Acme's key sees globex's wallet exactly as it sees a wallet that does not exist.
    let missing = "wal_000000000000000000000000";
    for wallet in [globex_wallet.as_str(), missing] {
        for path in [
            format!("/v1/wallets/{wallet}"),
            format!("/v1/wallets/{wallet}/balance"),
        ] {
            let answer = gateway.get(&path, &acme).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {answer:?}");
            assert_eq!(answer.problem_type(), "/problems/wallet-not-found");
        }
        let moves = [
            (
                "/v1/payments",
                json!({ "from_wallet_id": wallet, "to_wallet_id": acme_wallet, "amount": "1", "currency": "USD" }),
            ),
            (
                "/v1/payments",
                json!({ "from_wallet_id": acme_wallet, "to_wallet_id": wallet, "amount": "1", "currency": "USD" }),
            ),
            (
                "/v1/withdrawals",
                json!({ "wallet_id": wallet, "amount": "1", "currency": "USD" }),
            ),
            (
                "/v1/deposits",
                json!({ "wallet_id": wallet, "amount": "1", "currency": "USD" }),
            ),
        ];
        for (index, (path, body)) in moves.into_iter().enumerate() {
            let answer = gateway
                .post(path, &acme, &format!("steal-{wallet}-{index}"), body)
                .await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {answer:?}");
            assert_eq!(answer.problem_type(), "/problems/wallet-not-found");
        }
        let freeze = gateway
            .post(
                &format!("/v1/wallets/{wallet}/freeze"),
                &acme,
                &format!("freeze-{wallet}"),
                json!(null),
            )
            .await;
        assert_eq!(freeze.status, StatusCode::NOT_FOUND, "{freeze:?}");
    }
    let foreign = gateway
        .get(&format!("/v1/transactions/{globex_transaction}"), &acme)
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    // The same idempotency key in two tenants is two different requests.
    let same_key =
        |wallet: &str| json!({ "wallet_id": wallet, "amount": "2.00", "currency": "USD" });
    assert_eq!(
        gateway
            .post("/v1/deposits", &acme, "shared-key", same_key(&acme_wallet))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        gateway
            .post(
                "/v1/deposits",
                &globex,
                "shared-key",
                same_key(&globex_wallet)
            )
            .await
            .status,
        StatusCode::CREATED
    );

    assert_eq!(
        available(&gateway, &globex, &globex_wallet, None).await,
        "52.00"
    );
    assert_eq!(
        available(&gateway, &acme, &acme_wallet, None).await,
        "52.00"
    );

    // Scopes: a read-only key reads but cannot move money; a revoked key does nothing.
    let reader = gateway.create_key("acme", "read").await.unwrap();
    assert_eq!(
        available(&gateway, &reader, &acme_wallet, None).await,
        "52.00"
    );
    let write = gateway
        .post(
            "/v1/deposits",
            &reader,
            "reader-deposit",
            same_key(&acme_wallet),
        )
        .await;
    assert_eq!(write.status, StatusCode::FORBIDDEN, "{write:?}");
    gateway.revoke_key(&reader).await.unwrap();
    let mut revoked = StatusCode::OK;
    for _ in 0..100 {
        // The gateway trusts a key for a few seconds after it last checked it.
        revoked = gateway
            .get(&format!("/v1/wallets/{acme_wallet}"), &reader)
            .await
            .status;
        if revoked == StatusCode::UNAUTHORIZED {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(revoked, StatusCode::UNAUTHORIZED);
    assert_money_conserved(&platform).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_replay_refuse_changes_and_survive_restarts() {
    let (platform, mut gateway) = start().await;
    let key = gateway.create_key(TENANT, "read,write").await.unwrap();
    let alice = wallet_on(&gateway, &key, TENANT, 1, "alice").await;
    let bob = wallet_on(&gateway, &key, TENANT, 2, "bob").await;
    assert_eq!(
        deposit(&gateway, &key, &alice, "100.00").await.status,
        StatusCode::CREATED
    );
    let payment = |amount: &str| json!({ "from_wallet_id": alice, "to_wallet_id": bob, "amount": amount, "currency": "USD" });

    let first = gateway
        .post("/v1/payments", &key, "pay-once", payment("5.00"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(first.headers.get("idempotent-replayed").is_none());
    let replay = gateway
        .post("/v1/payments", &key, "pay-once", payment("5.00"))
        .await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body, first.body);
    let changed = gateway
        .post("/v1/payments", &key, "pay-once", payment("6.00"))
        .await;
    assert_eq!(changed.status, StatusCode::CONFLICT, "{changed:?}");
    assert_eq!(changed.problem_type(), "/problems/idempotency-key-reused");

    // A rejection is final for its key too.
    let rejected = gateway
        .post("/v1/payments", &key, "pay-too-much", payment("1000.00"))
        .await;
    assert_eq!(rejected.problem_type(), "/problems/insufficient-funds");
    assert_eq!(
        deposit(&gateway, &key, &alice, "2000.00").await.status,
        StatusCode::CREATED
    );
    let still_rejected = gateway
        .post("/v1/payments", &key, "pay-too-much", payment("1000.00"))
        .await;
    assert_eq!(still_rejected.body, rejected.body);

    // Concurrent duplicates make one transaction.
    let duplicates =
        (0..8).map(|_| gateway.post("/v1/payments", &key, "pay-concurrent", payment("7.00")));
    let answers = futures::future::join_all(duplicates).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|answer| {
            assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
            answer.text("transaction_id")
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");

    // Concurrent creations of one wallet make one wallet.
    let creations = (0..4).map(|_| {
        gateway.post(
            "/v1/wallets",
            &key,
            "create-concurrent",
            json!({ "owner_id": "carol", "currency": "USD" }),
        )
    });
    let created: std::collections::BTreeSet<String> = futures::future::join_all(creations)
        .await
        .iter()
        .map(|answer| {
            assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
            answer.text("wallet_id")
        })
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");

    // The records live in Postgres: a new gateway process replays them.
    gateway.restart().await.unwrap();
    let after_restart = gateway
        .post("/v1/payments", &key, "pay-once", payment("5.00"))
        .await;
    assert_eq!(after_restart.headers["idempotent-replayed"], "true");
    assert_eq!(after_restart.body, first.body);

    // 100 + 2000 deposited, 5 + 7 paid exactly once each.
    assert_eq!(available(&gateway, &key, &alice, None).await, "2088.00");
    assert_eq!(available(&gateway, &key, &bob, None).await, "12.00");
    assert_money_conserved(&platform).await;
}

/// The idempotency records, written in batches: whatever concurrent claims share a statement,
/// each gets the answer it would get alone — the first claim of a key proceeds and fixes its
/// route, later ones with the same request follow that route, another request gets a mismatch,
/// keys are per tenant, and once completed the first answer is replayed.
#[tokio::test(flavor = "multi_thread")]
async fn idempotency_claims_in_one_batch_answer_as_if_made_one_by_one() {
    use access_gateway::store::{self, Claim, Completion, NewClaim, Records};
    let database = integration_tests::postgres::fresh_database().await.unwrap();
    let records = Records::start(store::connect(&database.url).await.unwrap());
    let claim = |tenant: &str, key: &str, request: u8, shard: u32| NewClaim {
        tenant_id: tenant.into(),
        idempotency_key: key.into(),
        request_hash: [request; 32],
        txn_id: Some(format!("{tenant}/{key}")),
        coordinator_shard_id: Some(shard),
    };
    let proceed = |shard| Claim::Proceed {
        coordinator_shard_id: Some(shard),
    };
    // Sent together, in this order: they queue behind one another and leave in one or two
    // statements.
    let answers = futures::future::join_all([
        records.claim(claim("acme", "a", 1, 1)),
        records.claim(claim("acme", "a", 1, 2)),
        records.claim(claim("acme", "a", 2, 1)),
        records.claim(claim("other", "a", 2, 3)),
        records.claim(claim("acme", "b", 1, 2)),
    ])
    .await;
    let answers: Vec<Claim> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        answers,
        [
            proceed(1),
            proceed(1),
            Claim::Mismatch,
            proceed(3),
            proceed(2)
        ]
    );

    let completion = |key: &str, status_code: u16| Completion {
        tenant_id: "acme".into(),
        idempotency_key: key.into(),
        status_code,
        response: json!({ "key": key, "status": status_code }),
    };
    let completed = futures::future::join_all([
        records.complete(completion("a", 201)),
        records.complete(completion("b", 422)),
    ])
    .await;
    assert!(completed.iter().all(Result::is_ok), "{completed:?}");
    // A later final answer does not replace the first.
    records.complete(completion("a", 202)).await.unwrap();
    let answers = futures::future::join_all([
        records.claim(claim("acme", "a", 1, 2)),
        records.claim(claim("acme", "a", 2, 2)),
        records.claim(claim("acme", "b", 1, 1)),
        records.claim(claim("other", "a", 2, 1)),
    ])
    .await;
    let answers: Vec<Claim> = answers.into_iter().map(Result::unwrap).collect();
    let replay = |key: &str, status_code: u16| Claim::Replay {
        status_code,
        response: json!({ "key": key, "status": status_code }),
    };
    assert_eq!(
        answers,
        [
            replay("a", 201),
            Claim::Mismatch,
            replay("b", 422),
            proceed(3)
        ]
    );
}

/// Completing a key updates its row where it lies: the table's pages keep room for responses
/// the size of a payment's, so the update is heap-only and its indexes get no new entries.
#[tokio::test(flavor = "multi_thread")]
async fn completing_a_key_keeps_its_row_on_its_page() {
    use access_gateway::store::{self, Completion, NewClaim, Records};
    let database = integration_tests::postgres::fresh_database().await.unwrap();
    let pool = store::connect(&database.url).await.unwrap();
    let records = Records::start(pool.clone());
    let keys: Vec<String> = (0..200).map(|index| format!("pay-{index:06}")).collect();
    // Claimed together, as under load: the rows fill their pages as far as the table lets them.
    let claims = keys.iter().enumerate().map(|(index, key)| {
        records.claim(NewClaim {
            tenant_id: "acme".into(),
            idempotency_key: key.clone(),
            request_hash: [7; 32],
            txn_id: Some(format!("{index:040}")),
            coordinator_shard_id: Some(1),
        })
    });
    for claimed in futures::future::join_all(claims).await {
        claimed.unwrap();
    }
    let pages = || async {
        sqlx::query_as::<_, (String, f64)>(
            "SELECT idempotency_key, (ctid::text::point)[0] FROM idempotency_keys",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(key, page)| (key, page as u64))
        .collect::<BTreeMap<String, u64>>()
    };
    let before = pages().await;
    assert!(
        before.values().any(|page| *page > 0),
        "the claims span several pages: {before:?}"
    );
    let leg = |wallet: usize, amount: &str| {
        json!({
            "account": format!("wallet-{wallet:06}"),
            "amount": amount,
            "currency": "USD",
        })
    };
    for (index, key) in keys.iter().enumerate() {
        // A payment's response: its transaction, two legs and a consistency token.
        let response = json!({
            "transaction_id": format!("txn_{index:032x}"),
            "kind": "payment",
            "status": "committed",
            "done": true,
            "legs": [leg(index, "-0.01"), leg(index + 1, "0.01")],
            "metadata": {},
            "created_at_ms": 1_796_000_000_000_u64 + index as u64,
            "decided_at_ms": 1_796_000_000_010_u64 + index as u64,
            "consistency_token": format!("ct_{index:064x}"),
        });
        records
            .complete(Completion {
                tenant_id: "acme".into(),
                idempotency_key: key.clone(),
                status_code: 201,
                response,
            })
            .await
            .unwrap();
    }
    assert_eq!(pages().await, before);
}

/// Every connection of the gateway's pool plans each statement for its arguments, so the
/// batched idempotency statements never keep a plan made while their table was empty.
#[tokio::test(flavor = "multi_thread")]
async fn every_gateway_connection_plans_each_statement_for_its_arguments() {
    let database = integration_tests::postgres::fresh_database().await.unwrap();
    let pool = access_gateway::store::connect(&database.url).await.unwrap();
    // Held at once, so each is a connection of its own.
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(pool.acquire().await.unwrap());
    }
    for connection in &mut connections {
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&mut **connection)
            .await
            .unwrap();
        assert_eq!(mode, "force_custom_plan");
    }
}

/// The schema-driven fuzzer (schemathesis, installed by the test script) against
/// `/openapi.json`: no 5xx, and every response matches the documented status codes, media types
/// and schemas.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_fuzzer_finds_no_server_error_and_no_response_outside_the_schema() {
    let (_platform, gateway) = start().await;
    // An admin key: every operation, hierarchy edits included, is reachable.
    let key = gateway.create_key(TENANT, "admin").await.unwrap();
    let fuzzer = std::env::var("SCHEMATHESIS_BIN")
        .expect("SCHEMATHESIS_BIN is set by scripts/setup.sh (run the tests with scripts/test.sh)");
    // The fuzzer keeps a cache in its working directory: give it a throwaway one.
    let workdir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(fuzzer)
        .current_dir(workdir.path())
        .args([
            "run",
            &format!("{}/openapi.json", gateway.url),
            "--header",
            &format!("Authorization: Bearer {key}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "20",
            "--max-time",
            "60",
            "--request-timeout",
            "10",
            "--seed",
            "20261122",
            // Server-sent event streams stay open until their transaction is done.
            "--exclude-path-regex",
            "/events$",
        ])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the fuzzer found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("Tested: 31"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_key_is_rate_limited_on_its_own() {
    let platform = Platform::start_with_topology(1).await;
    let gateway = Gateway::start_with(&platform, &["--requests-per-second-max", "5"])
        .await
        .unwrap();
    let busy = gateway.create_key(TENANT, "read").await.unwrap();
    let quiet = gateway.create_key(TENANT, "read").await.unwrap();
    let missing = "/v1/wallets/wal_000000000000000000000000";
    let answers = futures::future::join_all((0..30).map(|_| gateway.get(missing, &busy))).await;
    let limited = answers
        .iter()
        .filter(|answer| answer.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(limited >= 20, "{limited} of 30 limited");
    let problem = answers
        .iter()
        .find(|answer| answer.status == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert_eq!(problem.problem_type(), "/problems/rate-limited");
    // Another key of the same tenant is not slowed by the busy one.
    assert_eq!(
        gateway.get(missing, &quiet).await.status,
        StatusCode::NOT_FOUND
    );
}
