//! The read side against real processes: storage shards and a coordinator, the `query`
//! binary (projector + account query service), the connector, a Kafka-compatible broker and
//! Postgres.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration_tests::group::Group;
use integration_tests::kafka::KafkaBroker;
use integration_tests::platform::{Platform, leg, minor, submit_request};
use integration_tests::postgres::fresh_database;
use integration_tests::process::{ServiceProcess, spawn};
use prost::Message as _;
use proto::auticuro::v1 as ledger;
use proto::common::v1::{ConsistencyToken, ShardSeq};
use proto::query::v1 as pb;
use proto::query::v1::account_query_client::AccountQueryClient;
use query::activity::{FEE_ACCOUNT_KEY, FEE_KEY, FROM_KEY, KIND_KEY, TO_KEY};
use query::connector::ShardSource;
use query::metrics::ProjectionMetrics;
use query::projector::Source;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{PgPool, Row};

fn sources(groups: &[&Group]) -> Vec<ShardSource> {
    groups
        .iter()
        .map(|group| ShardSource {
            shard_id: group.shard_id,
            replicas: group.replicas.iter().map(|r| r.address.clone()).collect(),
        })
        .collect()
}

fn shard_args(groups: &[&Group]) -> Vec<String> {
    sources(groups)
        .into_iter()
        .flat_map(|s| {
            [
                "--shard".to_string(),
                format!("{}={}", s.shard_id, s.replicas.join(",")),
            ]
        })
        .collect()
}

/// `query serve` projecting `groups` straight from the shards into `database_url`.
async fn serve_from_shards(database_url: &str, groups: &[&Group]) -> ServiceProcess {
    let mut args = vec![
        "serve".to_string(),
        "--database-url".into(),
        database_url.to_string(),
    ];
    args.extend(shard_args(groups));
    spawn(&deploy::process::workspace_binary("query"), &args)
        .await
        .unwrap()
}

/// Runs `query rebuild` of `groups` into `database_url` (from `snapshot`'s database, when
/// given) to completion; returns its standard error.
async fn rebuild(
    database_url: &str,
    groups: &[&Group],
    snapshot: Option<&str>,
) -> std::process::Output {
    let mut args = vec![
        "rebuild".to_string(),
        "--database-url".into(),
        database_url.to_string(),
    ];
    if let Some(live) = snapshot {
        args.extend(["--from-snapshot".to_string(), live.to_string()]);
    }
    args.extend(shard_args(groups));
    tokio::process::Command::new(deploy::process::workspace_binary("query"))
        .args(&args)
        .output()
        .await
        .unwrap()
}

/// Waits (bounded) until the projection has applied every shard's current head.
async fn wait_caught_up(pool: &PgPool, groups: &[&Group]) -> BTreeMap<u32, u64> {
    let mut heads = BTreeMap::new();
    for source in sources(groups) {
        heads.insert(source.shard_id, query::connector::head_seq(&source).await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = query::store::applied_seqs(pool).await.unwrap();
        if heads
            .iter()
            .all(|(shard, seq)| applied.get(shard).copied().unwrap_or(0) >= *seq)
        {
            return heads;
        }
        assert!(
            Instant::now() < deadline,
            "projection stuck at {applied:?}, heads {heads:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A digest of every projected table (everything but the projector's own clock).
async fn table_digests(pool: &PgPool) -> BTreeMap<&'static str, (i64, String)> {
    let tables = [
        (
            "ledger_events",
            "shard_id, seq, event_time, request_id, txn_id, kind, account_ids, payload",
        ),
        ("accounts", "*"),
        ("account_versions", "*"),
        ("transactions", "*"),
        ("transaction_legs", "*"),
        ("activities", "*"),
        ("projection_offsets", "shard_id, applied_seq, event_time"),
    ];
    let mut digests = BTreeMap::new();
    for (table, columns) in tables {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '')
             FROM (SELECT {columns} FROM {table}) t"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        digests.insert(table, (row.get::<i64, _>(0), row.get::<String, _>(1)));
    }
    // A rebuild loads without some indexes and builds them at the end: all must be back.
    let row = sqlx::query(
        "SELECT count(*), md5(string_agg(indexdef, '|' ORDER BY indexdef))
         FROM pg_indexes WHERE schemaname = 'query'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    digests.insert("indexes", (row.get::<i64, _>(0), row.get::<String, _>(1)));
    digests
}

/// A metadata value with every character the projector's COPY text format must escape.
const AWKWARD: &str = "tab\there, \"quoted\", back\\slash,\nnew line\r, {braces}";

fn payment_request(
    key: &str,
    from: &str,
    to: &str,
    amount: i128,
    fee: Option<(&str, i128)>,
) -> proto::marker::v1::SubmitRequest {
    let mut legs = vec![
        leg(from, -(amount + fee.map_or(0, |f| f.1))),
        leg(to, amount),
    ];
    let mut metadata = BTreeMap::from([
        (KIND_KEY.to_string(), "payment".to_string()),
        (FROM_KEY.to_string(), from.to_string()),
        (TO_KEY.to_string(), to.to_string()),
        ("order".to_string(), key.to_string()),
        ("note".to_string(), AWKWARD.to_string()),
    ]);
    if let Some((collector, fee)) = fee {
        legs.push(leg(collector, fee));
        metadata.insert(FEE_KEY.into(), fee.to_string());
        metadata.insert(FEE_ACCOUNT_KEY.into(), collector.into());
    }
    let mut request = submit_request(key, legs);
    request.metadata = metadata;
    request.wait_until_done = true;
    request
}

/// Places a hold of `amount` on `account` (on `shard`).
async fn place_hold(shard: &Group, hold_id: &str, account: &str, amount: i128) {
    let place = ledger::command::Kind::PlaceHold(ledger::PlaceHold {
        hold_id: hold_id.into(),
        account_id: account.to_string(),
        amount: Some(proto::common::v1::Amount {
            minor_units: amount.to_string(),
        }),
        currency: "USD".into(),
        metadata: BTreeMap::from([
            (KIND_KEY.to_string(), "hold".to_string()),
            (FROM_KEY.to_string(), account.to_string()),
        ]),
    });
    shard.execute_ok(format!("place-{hold_id}"), place).await;
}

async fn void_hold(shard: &Group, hold_id: &str) {
    let void = ledger::command::Kind::VoidHold(ledger::VoidHold {
        hold_id: hold_id.into(),
    });
    shard.execute_ok(format!("void-{hold_id}"), void).await;
}

/// Captures `amount` of the hold on `from` as a payment to `to`: the coordinator's reservation
/// draws from the hold.
async fn capture(platform: &Platform, hold_id: &str, from: &str, to: &str, amount: i128) {
    let mut capture = submit_request(
        &format!("capture-{hold_id}"),
        vec![leg(from, -amount), leg(to, amount)],
    );
    capture.hold_id = hold_id.into();
    capture.metadata = BTreeMap::from([
        (KIND_KEY.to_string(), "capture".to_string()),
        (FROM_KEY.to_string(), from.to_string()),
        (TO_KEY.to_string(), to.to_string()),
        (query::activity::HOLD_KEY.to_string(), hold_id.to_string()),
    ]);
    let captured = platform.submit(capture).await;
    assert_eq!(
        captured.status,
        proto::marker::v1::TransactionStatus::Committed as i32,
        "{captured:?}"
    );
}

async fn activities_of(
    client: &mut AccountQueryClient<tonic::transport::Channel>,
    tenant: &str,
    account: &str,
) -> Vec<pb::Activity> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_activities(pb::ListActivitiesRequest {
                tenant_id: tenant.into(),
                account_id: account.into(),
                page_token,
                page_size: 2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.activities);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_show_up_in_every_table_and_reads_see_their_writes() {
    let platform = Platform::start(&[]).await;
    let groups = [platform.shard(1), platform.shard(2)];
    let database = fresh_database().await.unwrap();
    let service = serve_from_shards(&database.url, &groups).await;
    let pool = query::store::connect(&database.url).await.unwrap();
    let mut client = AccountQueryClient::new(auticuro::client::channel(service.address()).unwrap());

    let alice = platform.open(1, "tenant-a/alice", 10_000).await;
    let carol = platform.open(1, "tenant-a/carol", 0).await;
    let fees = platform.open(1, "tenant-a/fees", 0).await;
    let bob = platform.open(2, "tenant-a/bob", 0).await;
    // Across shards with a fee, within one shard, and one that cannot be paid.
    let across = platform
        .submit(payment_request(
            "p-across",
            &alice,
            &bob,
            1_000,
            Some((&fees, 30)),
        ))
        .await;
    let within = platform
        .submit(payment_request("p-within", &alice, &carol, 200, None))
        .await;
    let refused = platform
        .submit(payment_request("p-refused", &alice, &bob, 1_000_000, None))
        .await;
    use proto::marker::v1::TransactionStatus;
    assert_eq!(across.status, TransactionStatus::Committed as i32);
    assert_eq!(within.status, TransactionStatus::Committed as i32);
    assert_eq!(refused.status, TransactionStatus::Aborted as i32);
    // A batch that moves two currencies at once (straight on the shard).
    let shard = platform.shard(1);
    for (id, unbounded) in [("tenant-a/eur-x", true), ("tenant-a/eur-y", false)] {
        let create = ledger::command::Kind::CreateAccount(ledger::CreateAccount {
            account_id: id.into(),
            currency: "EUR".into(),
            scale: 2,
            no_lower_limit: unbounded,
            ..Default::default()
        });
        shard.execute_ok(format!("c-{id}"), create).await;
    }
    let two_currencies = ledger::command::Kind::Batch(ledger::Batch {
        legs: vec![
            leg(&alice, -5),
            leg(&carol, 5),
            ledger::Leg {
                currency: "EUR".into(),
                ..leg("tenant-a/eur-x", -7)
            },
            ledger::Leg {
                currency: "EUR".into(),
                ..leg("tenant-a/eur-y", 7)
            },
        ],
        ..Default::default()
    });
    let batch = shard
        .execute(integration_tests::commands::command(
            "two-currencies",
            two_currencies,
        ))
        .await
        .unwrap();
    assert!(integration_tests::commands::ok(&batch), "{batch:?}");

    // Read-your-write: the token of the payment just made.
    let bob_balance = client
        .get_balance(pb::GetBalanceRequest {
            tenant_id: "tenant-a".into(),
            account_id: bob.clone(),
            consistency_token: across.consistency_token.clone(),
            wait_ms_max: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::get_balance_response::Reply::View(view)) = bob_balance.reply else {
        panic!("no view of bob: {bob_balance:?}");
    };
    assert_eq!(minor(&view.account.unwrap().balance), 1_000);
    let token_seq = |token: &Option<ConsistencyToken>, shard: u32| {
        token
            .as_ref()
            .unwrap()
            .shard_seqs
            .iter()
            .find(|s| s.shard_id == shard)
            .map(|s| s.seq)
    };
    assert!(view.seq >= token_seq(&across.consistency_token, 2).unwrap());
    // A token from the future is a typed NotCaughtUp after the bounded wait.
    let future = client
        .get_balance(pb::GetBalanceRequest {
            tenant_id: "tenant-a".into(),
            account_id: bob.clone(),
            consistency_token: Some(ConsistencyToken {
                shard_seqs: vec![ShardSeq {
                    shard_id: 2,
                    seq: 1_000_000,
                }],
            }),
            wait_ms_max: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(future.reply, Some(pb::get_balance_response::Reply::NotCaughtUp(ref n)) if n.wanted[0].seq == 1_000_000),
        "{future:?}"
    );
    // Another tenant cannot see the account.
    let other = client
        .get_balance(pb::GetBalanceRequest {
            tenant_id: "tenant-b".into(),
            account_id: bob.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        other.reply,
        Some(pb::get_balance_response::Reply::NotFound(true))
    );

    // Every table agrees with the shards.
    let truth = platform.balances().await;
    let heads = wait_caught_up(&pool, &groups).await;
    for (shard, head) in &heads {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE shard_id = $1")
                .bind(*shard as i32)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(count as u64, *head, "every event of shard {shard}, once");
    }
    for group in groups {
        for (account_id, account) in &group.accounts().await.unwrap() {
            let row = sqlx::query(
                "SELECT balance::text, pending_out::text, pending_in::text, version, state,
                    (SELECT count(*) FROM account_versions v
                     WHERE v.account_id = a.account_id AND v.shard_id = a.shard_id),
                    (SELECT balance::text FROM account_versions v
                     WHERE v.account_id = a.account_id AND v.shard_id = a.shard_id
                     ORDER BY version DESC LIMIT 1)
             FROM accounts a WHERE account_id = $1 AND shard_id = $2",
            )
            .bind(account_id)
            .bind(group.shard_id as i32)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(
                row.get::<String, _>(0),
                minor(&account.balance).to_string(),
                "{account_id}"
            );
            assert_eq!(
                row.get::<String, _>(1),
                minor(&account.pending_out).to_string()
            );
            assert_eq!(
                row.get::<String, _>(2),
                minor(&account.pending_in).to_string()
            );
            assert_eq!(row.get::<i64, _>(3) as u64, account.version, "{account_id}");
            assert_eq!(row.get::<String, _>(4), "active");
            assert_eq!(
                row.get::<i64, _>(5) as u64,
                account.version,
                "one row per version"
            );
            assert_eq!(row.get::<String, _>(6), minor(&account.balance).to_string());
        }
    }
    let transaction = |txn_id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT kind, status FROM transactions WHERE txn_id = $1")
                .bind(txn_id)
                .fetch_one(&pool)
                .await
                .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
                .unwrap()
        }
    };
    assert_eq!(
        transaction(across.txn_id.clone()).await,
        ("payment".into(), "committed".into())
    );
    assert_eq!(
        transaction(within.txn_id.clone()).await,
        ("payment".into(), "committed".into())
    );
    let legs: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT shard_id, amount::text, state FROM transaction_legs l WHERE txn_id = $1
         ORDER BY l.amount",
    )
    .bind(&across.txn_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        legs,
        vec![
            (1, "-1030".into(), "posted".into()),
            (1, "30".into(), "posted".into()),
            (2, "1000".into(), "posted".into())
        ]
    );

    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT account_id, amount::text, currency FROM activities a
         JOIN ledger_events e ON e.shard_id = 1 AND e.request_id = 'two-currencies'
              AND a.activity_id >> 53 = 1
              AND a.activity_id >> 10 & ((1::bigint << 43) - 1) = e.seq
         ORDER BY a.activity_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (alice.clone(), "-5".into(), "USD".into()),
            (carol.clone(), "5".into(), "USD".into()),
            ("tenant-a/eur-x".into(), "-7".into(), "EUR".into()),
            ("tenant-a/eur-y".into(), "7".into(), "EUR".into()),
        ],
        "each currency's legs with their own currency"
    );

    // The activity feed, through the service, paginated two at a time.
    let summary = |activities: Vec<pb::Activity>| -> Vec<(i32, String, String)> {
        activities
            .into_iter()
            .filter(|a| !a.txn_id.is_empty())
            .map(|a| {
                (
                    a.kind,
                    a.amount.unwrap().minor_units,
                    a.counterparty_account_id,
                )
            })
            .collect()
    };
    use pb::ActivityKind as K;
    let mut alices = summary(activities_of(&mut client, "tenant-a", &alice).await);
    alices.sort();
    assert_eq!(
        alices,
        vec![
            (K::PaymentSent as i32, "-1000".into(), bob.clone()),
            (K::PaymentSent as i32, "-200".into(), carol.clone()),
            (K::Fee as i32, "-30".into(), fees.clone()),
        ]
    );
    assert_eq!(
        summary(activities_of(&mut client, "tenant-a", &bob).await),
        vec![(K::PaymentReceived as i32, "1000".into(), alice.clone())]
    );
    assert_eq!(
        summary(activities_of(&mut client, "tenant-a", &fees).await),
        vec![(K::Fee as i32, "30".into(), alice.clone())]
    );
    assert!(
        activities_of(&mut client, "tenant-b", &alice)
            .await
            .is_empty()
    );
    let feed = activities_of(&mut client, "tenant-a", &alice).await;
    assert!(
        feed.windows(2)
            .all(|w| (w[0].timestamp_ms, w[0].activity_id) > (w[1].timestamp_ms, w[1].activity_id)),
        "newest first, no repeats across pages"
    );
    assert_eq!(
        feed.iter()
            .find(|a| a.txn_id == across.txn_id)
            .unwrap()
            .metadata
            .get("order")
            .map(String::as_str),
        Some("p-across"),
        "the caller's metadata, without the gateway's own keys"
    );
    let stored: (String, Vec<u8>, Vec<String>) = sqlx::query_as(
        "SELECT a.metadata ->> 'note', e.payload, e.account_ids
         FROM activities a JOIN ledger_events e ON e.txn_id = a.txn_id AND e.kind = 'post'
         WHERE a.txn_id = $1 LIMIT 1",
    )
    .bind(&across.txn_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored.0, AWKWARD, "text survives the projector's COPY");
    let event = ledger::Event::decode(stored.1.as_slice()).unwrap();
    assert_eq!(
        stored.2,
        event
            .accounts
            .iter()
            .map(|a| a.account_id.clone())
            .collect::<Vec<_>>(),
        "the raw event and its account ids"
    );
    assert!(
        feed.iter()
            .all(|a| a.metadata.keys().all(|k| !k.starts_with("wallet:")))
    );

    // History by version, and balance as of a seq.
    let history = client
        .get_history(pb::GetHistoryRequest {
            tenant_id: "tenant-a".into(),
            account_id: alice.clone(),
            before_version: 0,
            page_size: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u64> = history
        .versions
        .iter()
        .map(|v| v.account.as_ref().unwrap().version)
        .collect();
    let newest = truth[&alice].version;
    assert_eq!(versions, (1..=newest).rev().collect::<Vec<_>>());
    let before_across = history
        .versions
        .iter()
        .find(|v| v.last_txn_id == across.txn_id)
        .map(|v| v.seq - 1)
        .unwrap();
    let at = client
        .get_balance_at(pb::GetBalanceAtRequest {
            tenant_id: "tenant-a".into(),
            account_id: alice.clone(),
            at: Some(pb::get_balance_at_request::At::Seq(before_across)),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::get_balance_at_response::Reply::View(at)) = at.reply else {
        panic!("no balance at {before_across}");
    };
    assert_eq!(
        minor(&at.account.unwrap().balance),
        10_000,
        "before the first payment"
    );

    let (status, metrics) = deploy::process::http_get(service.address(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "query_projection_applied_seq{{shard=\"2\"}} {}",
            heads[&2]
        )),
        "{metrics}"
    );
    // The lag in events is sampled every few seconds; caught up, it reads 0.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, metrics) = deploy::process::http_get(service.address(), "/metrics")
            .await
            .unwrap();
        if metrics.contains("query_projection_lag_events{shard=\"2\"} 0") {
            break;
        }
        assert!(Instant::now() < deadline, "no lag sample: {metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Shard events as the shard serves them, for producing to a topic by hand.
async fn events_of(group: &Group) -> Vec<ledger::Event> {
    let leader = group.leader().await.unwrap();
    let mut client = group.ledger(leader).await.unwrap();
    client
        .read_events(ledger::ReadEventsRequest {
            from_seq: 1,
            to_seq: 0,
            limit: 1_000,
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn produce(broker: &KafkaBroker, topic: &str, events: &[&ledger::Event]) {
    let producer: FutureProducer = broker.client_config().create().unwrap();
    for event in events {
        let payload = event.encode_to_vec();
        let key = event.shard_id.to_string();
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
}

async fn wait_applied(pool: &PgPool, shard: u32, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while query::store::applied_seqs(pool)
        .await
        .unwrap()
        .get(&shard)
        .copied()
        .unwrap_or(0)
        < seq
    {
        assert!(
            Instant::now() < deadline,
            "shard {shard} never reached {seq}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gap_stops_the_shards_projection_until_the_missing_event_arrives() {
    let shard = Group::storage(41, 3, &[]).await.unwrap();
    use integration_tests::commands::{command, create, transfer};
    shard
        .execute(command("c-funding", create("sys:funding:USD", true)))
        .await
        .unwrap();
    shard
        .execute(command("c-alice", create("alice", false)))
        .await
        .unwrap();
    for n in 0..6 {
        shard
            .execute(command(
                format!("fund-{n}"),
                transfer("sys:funding:USD", "alice", 1),
            ))
            .await
            .unwrap();
    }
    let events = events_of(&shard).await;
    assert_eq!(events.len(), 8);

    let broker = KafkaBroker::shared().unwrap();
    let topic = broker.fresh_topic("wallet.ledger.events", 1).await.unwrap();
    let database = fresh_database().await.unwrap();
    let pool = query::store::connect(&database.url).await.unwrap();
    let metrics = ProjectionMetrics::default();
    let projector = tokio::spawn(query::projector::run(
        pool.clone(),
        Source::Kafka {
            brokers: broker.bootstrap_servers().into(),
            topic: topic.clone(),
            group: format!("{topic}-projector"),
        },
        metrics.clone(),
    ));
    // Seq 5 is missing; 3 comes twice.
    let [e1, e2, e3, e4, e5, e6, e7, e8] = &events[..] else {
        unreachable!()
    };
    produce(broker, &topic, &[e1, e2, e3, e3, e4, e6, e7]).await;
    wait_applied(&pool, 41, 4).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.gap_of(41) != 5 {
        assert!(Instant::now() < deadline, "no gap alarm");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.alarm_count() >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let projected: i64 = sqlx::query_scalar("SELECT max(seq) FROM ledger_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(projected, 4, "nothing past the gap is written");
    let balance: String =
        sqlx::query_scalar("SELECT balance::text FROM accounts WHERE account_id = 'alice'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(balance, "2", "alice as of seq 4");

    // The missing event arrives (late, after the ones it precedes), then the rest.
    produce(broker, &topic, &[e5, e8]).await;
    wait_applied(&pool, 41, 8).await;
    assert_eq!(metrics.gap_of(41), 0);
    let versions: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, balance::text FROM account_versions WHERE account_id = 'alice' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        versions,
        (2..=8)
            .map(|seq| (seq, (seq - 2).to_string()))
            .collect::<Vec<_>>(),
        "every version once, in order"
    );
    projector.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_projection_survives_kill_9_and_equals_a_rebuild_from_the_shards() {
    let platform = std::sync::Arc::new(Platform::start(&[]).await);
    let groups = [platform.shard(1), platform.shard(2)];
    let broker = KafkaBroker::shared().unwrap();
    let topic = broker.fresh_topic("wallet.ledger.events", 2).await.unwrap();
    let binary = deploy::process::workspace_binary("query");
    let mut connect = vec![
        "connect".to_string(),
        "--kafka-brokers".into(),
        broker.bootstrap_servers().into(),
        "--kafka-topic".into(),
        topic.clone(),
    ];
    connect.extend(shard_args(&groups));
    let _connector = spawn(&binary, &connect).await.unwrap();
    let live = fresh_database().await.unwrap();
    let args = vec![
        "serve".to_string(),
        "--database-url".into(),
        live.url.clone(),
        "--kafka-brokers".into(),
        broker.bootstrap_servers().into(),
        "--kafka-topic".into(),
        topic.clone(),
        "--kafka-group".into(),
        format!("{topic}-live"),
    ];
    let mut service = spawn(&binary, &args).await.unwrap();
    let pool = query::store::connect(&live.url).await.unwrap();

    let mut accounts = Vec::new();
    for n in 0..4 {
        accounts.push(
            platform
                .open(1 + n % 2, &format!("tenant-a/w{n}"), 100_000)
                .await,
        );
    }
    let payments = tokio::spawn({
        let platform = platform.clone();
        let accounts = accounts.clone();
        async move {
            for n in 0..60usize {
                let (from, to) = (&accounts[n % 4], &accounts[(n + 1) % 4]);
                let fee = (n % 3 == 0).then_some((accounts[(n + 2) % 4].as_str(), 5));
                platform
                    .submit(payment_request(
                        &format!("k-{n}"),
                        from,
                        to,
                        100 + n as i128,
                        fee,
                    ))
                    .await;
            }
        }
    });
    // kill -9 while events keep coming, once some are projected.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query::store::applied_seqs(&pool)
        .await
        .unwrap()
        .values()
        .sum::<u64>()
        < 40
    {
        assert!(Instant::now() < deadline, "the projection never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    service.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _service = spawn(&binary, &args).await.unwrap();
    payments.await.unwrap();
    // Once nothing is in flight, no event comes any more.
    platform.balances().await;
    let heads = wait_caught_up(&pool, &groups).await;

    // A rebuild straight from the shards into a fresh database gives the same tables.
    let rebuilt = fresh_database().await.unwrap();
    let output = rebuild(&rebuilt.url, &groups, None).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rebuilt_pool = query::store::connect(&rebuilt.url).await.unwrap();
    assert_eq!(
        query::store::applied_seqs(&rebuilt_pool).await.unwrap(),
        heads,
        "the rebuild stops at the heads it saw"
    );
    let live_tables = table_digests(&pool).await;
    assert!(live_tables["activities"].0 > 60, "{live_tables:?}");
    assert_eq!(live_tables, table_digests(&rebuilt_pool).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hierarchy_node_sums_its_subtree_and_invalid_edits_are_refused() {
    use proto::query::v1::HierarchyOutcome as Outcome;
    use proto::query::v1::hierarchy_client::HierarchyClient;
    let platform = std::sync::Arc::new(Platform::start(&[]).await);
    let groups = [platform.shard(1), platform.shard(2)];
    let database = fresh_database().await.unwrap();
    let service = serve_from_shards(&database.url, &groups).await;
    let pool = query::store::connect(&database.url).await.unwrap();
    let mut tree = HierarchyClient::new(auticuro::client::channel(service.address()).unwrap());

    let mut wallets = Vec::new();
    for n in 0..4u32 {
        wallets.push(
            platform
                .open(1 + n % 2, &format!("tenant-a/h{n}"), 10_000)
                .await,
        );
    }
    let fees = platform.open(1, "tenant-a/hfees", 0).await;
    let stranger = platform.open(2, "tenant-b/h", 0).await;
    wait_caught_up(&pool, &groups).await;

    let tenant = "tenant-a";
    let create = |name: &str, parent: &str| pb::CreateNodeRequest {
        tenant_id: tenant.into(),
        name: name.into(),
        parent_id: parent.into(),
    };
    let node_of = |result: pb::HierarchyResult| {
        assert_eq!(result.outcome, Outcome::Ok as i32, "{result:?}");
        result.node.unwrap().node_id
    };
    let root = node_of(
        tree.create_node(create("company", ""))
            .await
            .unwrap()
            .into_inner(),
    );
    let eu = node_of(
        tree.create_node(create("eu", &root))
            .await
            .unwrap()
            .into_inner(),
    );
    let paris = node_of(
        tree.create_node(create("paris", &eu))
            .await
            .unwrap()
            .into_inner(),
    );
    let us = node_of(
        tree.create_node(create("us", &root))
            .await
            .unwrap()
            .into_inner(),
    );
    let attach = |node: &str, account: &str| pb::AttachAccountRequest {
        tenant_id: tenant.into(),
        node_id: node.into(),
        account_id: account.into(),
    };
    for (node, wallet) in [(&paris, 0), (&paris, 1), (&eu, 2), (&us, 3)] {
        node_of(
            tree.attach_account(attach(node, &wallets[wallet]))
                .await
                .unwrap()
                .into_inner(),
        );
    }

    // Invalid edits change nothing.
    let outcome_of = |result: Result<tonic::Response<pb::HierarchyResult>, tonic::Status>| {
        Outcome::try_from(result.unwrap().into_inner().outcome).unwrap()
    };
    let moving = |node: &str, parent: &str| pb::MoveNodeRequest {
        tenant_id: tenant.into(),
        node_id: node.into(),
        new_parent_id: parent.into(),
    };
    assert_eq!(
        outcome_of(tree.move_node(moving(&root, &paris)).await),
        Outcome::Cycle
    );
    assert_eq!(
        outcome_of(tree.move_node(moving(&eu, &eu)).await),
        Outcome::Cycle
    );
    let delete = |node: &str| pb::DeleteNodeRequest {
        tenant_id: tenant.into(),
        node_id: node.into(),
    };
    assert_eq!(
        outcome_of(tree.delete_node(delete(&eu)).await),
        Outcome::NotEmpty
    );
    assert_eq!(
        outcome_of(tree.attach_account(attach(&root, &stranger)).await),
        Outcome::CrossTenant
    );
    assert_eq!(
        outcome_of(tree.attach_account(attach(&us, &wallets[0])).await),
        Outcome::AlreadyAttached
    );
    assert_eq!(
        outcome_of(tree.attach_account(attach(&us, "tenant-a/nobody")).await),
        Outcome::AccountNotFound
    );
    // Malformed ids (a NUL byte, which the database cannot even hold) name nothing.
    assert_eq!(
        outcome_of(tree.move_node(moving(&eu, "\0")).await),
        Outcome::NotFound
    );
    assert_eq!(
        outcome_of(tree.delete_node(delete("node_\0")).await),
        Outcome::NotFound
    );
    assert_eq!(
        outcome_of(tree.attach_account(attach(&us, "tenant-a/\0")).await),
        Outcome::AccountNotFound
    );
    assert_eq!(
        outcome_of(tree.create_node(create(" ", &root)).await),
        Outcome::InvalidName
    );
    assert_eq!(
        outcome_of(tree.create_node(create(&"x".repeat(101), &root)).await),
        Outcome::InvalidName
    );
    let foreign = pb::CreateNodeRequest {
        tenant_id: "tenant-b".into(),
        name: "mine".into(),
        parent_id: root.clone(),
    };
    assert_eq!(
        outcome_of(tree.create_node(foreign).await),
        Outcome::NotFound
    );
    let shape = tree
        .get_tree(pb::GetTreeRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(shape.len(), 4);
    let root_node = shape.iter().find(|n| n.node_id == root).unwrap();
    assert_eq!(root_node.parent_id, "");
    assert_eq!(root_node.child_node_ids.len(), 2);

    // Concurrent payments inside the tree, with fees leaving it.
    let mut payers = Vec::new();
    for worker in 0..3usize {
        let platform = platform.clone();
        let wallets = wallets.clone();
        let fees = fees.clone();
        payers.push(tokio::spawn(async move {
            for n in 0..8usize {
                let i = worker * 8 + n;
                let (from, to) = (&wallets[i % 4], &wallets[(i + 1 + worker) % 4]);
                let fee = (i % 2 == 0).then_some((fees.as_str(), 7));
                platform
                    .submit(payment_request(
                        &format!("h-{i}"),
                        from,
                        to,
                        50 + i as i128,
                        fee,
                    ))
                    .await;
            }
        }));
    }
    for payer in payers {
        payer.await.unwrap();
    }
    let truth = platform.balances().await;
    let heads = wait_caught_up(&pool, &groups).await;
    let reader = tree.clone();
    let balance_of = |node: String| {
        let mut tree = reader.clone();
        async move {
            let reply = tree
                .get_node_balance(pb::GetNodeBalanceRequest {
                    tenant_id: tenant.into(),
                    node_id: node,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.outcome, Outcome::Ok as i32);
            let as_of: BTreeMap<u32, u64> =
                reply.as_of.iter().map(|s| (s.shard_id, s.seq)).collect();
            let usd = reply
                .balances
                .iter()
                .find(|b| b.currency == "USD")
                .map(|b| minor(&b.balance));
            (usd, as_of)
        }
    };
    let leaves = |indexes: &[usize]| -> i128 {
        indexes
            .iter()
            .map(|i| minor(&truth[&wallets[*i]].balance))
            .sum()
    };
    let (total, as_of) = balance_of(root.clone()).await;
    assert_eq!(
        as_of, heads,
        "sums consistent with the applied seqs they name"
    );
    // The whole tree with every node's roll-up, in one snapshot, agrees node by node.
    let whole = tree
        .clone()
        .get_tree(pb::GetTreeRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let whole_as_of: BTreeMap<u32, u64> = whole.as_of.iter().map(|s| (s.shard_id, s.seq)).collect();
    assert_eq!(whole_as_of, heads);
    assert_eq!(whole.balances.len(), 4, "every node has accounts below it");
    for node in &whole.balances {
        let usd = node
            .balances
            .iter()
            .find(|b| b.currency == "USD")
            .map(|b| minor(&b.balance));
        assert_eq!(
            usd,
            balance_of(node.node_id.clone()).await.0,
            "{}",
            node.node_id
        );
    }
    assert_eq!(total, Some(leaves(&[0, 1, 2, 3])));
    assert!(total.unwrap() < 40_000, "the fees left the tree");
    assert_eq!(balance_of(eu.clone()).await.0, Some(leaves(&[0, 1, 2])));
    assert_eq!(balance_of(paris.clone()).await.0, Some(leaves(&[0, 1])));
    assert_eq!(balance_of(us.clone()).await.0, Some(leaves(&[3])));

    // Valid edits: Paris moves under the US, then a detached, emptied node can go.
    let moved = tree
        .move_node(moving(&paris, &us))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.node.unwrap().parent_id, us);
    assert_eq!(balance_of(eu.clone()).await.0, Some(leaves(&[2])));
    assert_eq!(balance_of(us.clone()).await.0, Some(leaves(&[0, 1, 3])));
    let detach = pb::DetachAccountRequest {
        tenant_id: tenant.into(),
        node_id: eu.clone(),
        account_id: wallets[2].clone(),
    };
    assert!(
        tree.detach_account(detach.clone())
            .await
            .unwrap()
            .into_inner()
            .node
            .unwrap()
            .account_ids
            .is_empty()
    );
    assert_eq!(
        outcome_of(tree.detach_account(detach).await),
        Outcome::NotFound
    );
    assert_eq!(
        balance_of(eu.clone()).await.0,
        None,
        "an empty subtree has no balance"
    );
    assert_eq!(outcome_of(tree.delete_node(delete(&eu)).await), Outcome::Ok);
    let other_tenant = tree
        .get_node_balance(pb::GetNodeBalanceRequest {
            tenant_id: "tenant-b".into(),
            node_id: root.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other_tenant.outcome, Outcome::NotFound as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_from_a_snapshot_replays_only_the_events_after_it() {
    let platform = Platform::start(&[]).await;
    let groups = [platform.shard(1), platform.shard(2)];
    let live = fresh_database().await.unwrap();
    let _service = serve_from_shards(&live.url, &groups).await;
    let pool = query::store::connect(&live.url).await.unwrap();
    let binary = deploy::process::workspace_binary("query");
    let alice = platform.open(1, "tenant-a/s-alice", 10_000).await;
    let bob = platform.open(2, "tenant-a/s-bob", 10_000).await;
    for n in 0..5 {
        platform
            .submit(payment_request(
                &format!("s-{n}"),
                &alice,
                &bob,
                10 + n as i128,
                None,
            ))
            .await;
    }
    // Holds placed before the snapshot: one voided after it, one captured after it, one open.
    let shard = platform.shard(1);
    for (hold_id, amount) in [("s:void", 20), ("s:capture", 30), ("s:open", 40)] {
        place_hold(shard, hold_id, &alice, amount).await;
    }
    platform.balances().await;
    wait_caught_up(&pool, &groups).await;
    let snapshot = tokio::process::Command::new(&binary)
        .args(["snapshot", "--database-url", &live.url])
        .output()
        .await
        .unwrap();
    assert!(snapshot.status.success(), "{snapshot:?}");
    let at_snapshot: u64 = query::store::applied_seqs(&pool)
        .await
        .unwrap()
        .values()
        .sum();
    for n in 5..12 {
        platform
            .submit(payment_request(
                &format!("s-{n}"),
                &bob,
                &alice,
                3 + n as i128,
                None,
            ))
            .await;
    }
    void_hold(shard, "s:void").await;
    capture(&platform, "s:capture", &alice, &bob, 25).await;
    platform.balances().await;
    let heads = wait_caught_up(&pool, &groups).await;

    let rebuilt = fresh_database().await.unwrap();
    let output = rebuild(&rebuilt.url, &groups, Some(&live.url)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let replayed = heads.values().sum::<u64>() - at_snapshot;
    assert!(replayed > 0 && at_snapshot > 0);
    assert!(
        stderr.contains(&format!("replayed {replayed} events")),
        "only the events after the snapshot: {stderr}"
    );
    let rebuilt_pool = query::store::connect(&rebuilt.url).await.unwrap();
    assert_eq!(
        table_digests(&pool).await,
        table_digests(&rebuilt_pool).await
    );
    // A second rebuild into the same database is refused: it is not empty.
    let again = rebuild(&rebuilt.url, &groups, Some(&live.url)).await;
    assert!(!again.status.success());
    // So is one into a database holding events without applied seqs (a rebuild killed while
    // its tables committed), and it leaves that database as it was.
    sqlx::query("DELETE FROM projection_offsets")
        .execute(&rebuilt_pool)
        .await
        .unwrap();
    let events_before = table_digests(&rebuilt_pool).await["ledger_events"].clone();
    assert!(matches!(
        query::snapshot::restore(&pool, &rebuilt_pool).await,
        Err(query::store::StoreError::NotEmpty)
    ));
    let again = rebuild(&rebuilt.url, &groups, None).await;
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("needs an empty database"), "{stderr}");
    assert_eq!(
        table_digests(&rebuilt_pool).await["ledger_events"],
        events_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_are_projected_as_authorized_then_captured_or_voided_and_a_rebuild_agrees() {
    let platform = Platform::start(&[]).await;
    let groups = [platform.shard(1), platform.shard(2)];
    let database = fresh_database().await.unwrap();
    let service = serve_from_shards(&database.url, &groups).await;
    let pool = query::store::connect(&database.url).await.unwrap();
    let mut client = AccountQueryClient::new(auticuro::client::channel(service.address()).unwrap());
    let alice = platform.open(1, "tenant-a/h-alice", 1_000).await;
    let bob = platform.open(2, "tenant-a/h-bob", 0).await;
    let shard = platform.shard(1);
    place_hold(shard, "h:captured", &alice, 600).await;
    place_hold(shard, "h:voided", &alice, 300).await;
    void_hold(shard, "h:voided").await;
    // Capture 450 of the 600 across shards.
    capture(&platform, "h:captured", &alice, &bob, 450).await;
    let balances = platform.balances().await;
    assert_eq!(minor(&balances[&alice].balance), 550);
    assert_eq!(minor(&balances[&alice].pending_out), 0);
    assert_eq!(minor(&balances[&bob].balance), 450);
    wait_caught_up(&pool, &groups).await;

    let holds: Vec<(String, String, String)> = sqlx::query(
        "SELECT t.txn_id, t.status, l.state FROM transactions t
         JOIN transaction_legs l USING (txn_id) WHERE t.kind = 'hold' ORDER BY t.txn_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2)))
    .collect();
    let expected = [
        ("h:captured", "captured", "posted"),
        ("h:voided", "voided", "voided"),
    ];
    assert_eq!(
        holds,
        expected.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    let feed: Vec<(i32, String)> = activities_of(&mut client, "tenant-a", &alice)
        .await
        .iter()
        .map(|a| (a.kind, minor(&a.amount)))
        .map(|(kind, amount)| (kind, amount.to_string()))
        .collect();
    use pb::ActivityKind;
    let expected = [
        (ActivityKind::Capture, "-450"),
        (ActivityKind::Void, "300"),
        (ActivityKind::Hold, "-300"),
        (ActivityKind::Hold, "-600"),
    ];
    assert_eq!(
        &feed[..4],
        expected.map(|(kind, amount)| (kind as i32, amount.to_string()))
    );
    // A hold still open at the end, and a payment across the shards.
    place_hold(shard, "h:open", &alice, 100).await;
    platform
        .submit(payment_request("h-pay", &bob, &alice, 50, None))
        .await;
    platform.balances().await;
    wait_caught_up(&pool, &groups).await;
    let live = table_digests(&pool).await;

    let rebuilt = fresh_database().await.unwrap();
    let output = rebuild(&rebuilt.url, &groups, None).await;
    assert!(output.status.success(), "{output:?}");
    let rebuilt_pool = query::store::connect(&rebuilt.url).await.unwrap();
    assert_eq!(live, table_digests(&rebuilt_pool).await);

    // However the events fall into batches, and in whichever order the shards come, projecting
    // batch by batch and loading in bulk give the same tables.
    let (first, second) = (events_of(groups[0]).await, events_of(groups[1]).await);
    // A bulk load dropped before it finishes (an error, a cancelled rebuild) changes nothing:
    // a whole load after it gives the same tables, indexes included.
    let events: Vec<ledger::Event> = [first.clone(), second.clone()].concat();
    let database = fresh_database().await.unwrap();
    let pool = query::store::connect(&database.url).await.unwrap();
    let mut dropped = query::store::BulkLoad::open(&pool).await.unwrap();
    let half = &events[..events.len() / 2];
    dropped.write(prepared(half)).await.unwrap();
    drop(dropped);
    project_in_batches(&pool, &events, 1_000, true).await;
    assert_eq!(
        live,
        table_digests(&pool).await,
        "after a dropped bulk load"
    );
    // So does one on top of projected tables (as on a snapshot) holding held legs, which the
    // load takes out to write them again.
    let database = fresh_database().await.unwrap();
    let pool = query::store::connect(&database.url).await.unwrap();
    project_in_batches(&pool, &first, 1_000, false).await;
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transaction_legs WHERE state = 'held'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(held > 0);
    let before = table_digests(&pool).await;
    let mut dropped = query::store::BulkLoad::open(&pool).await.unwrap();
    dropped
        .write(prepared(&second[..second.len() / 2]))
        .await
        .unwrap();
    drop(dropped);
    assert_eq!(
        before,
        table_digests(&pool).await,
        "after a dropped bulk load on top"
    );
    project_in_batches(&pool, &second, 1_000, true).await;
    assert_eq!(live, table_digests(&pool).await, "a bulk load on top");
    for (size, bulk) in [(1, false), (4, false), (1, true), (3, true), (1_000, true)] {
        for shard_two_first in [false, true] {
            let mut order = [first.clone(), second.clone()];
            if shard_two_first {
                order.reverse();
            }
            let events: Vec<ledger::Event> = order.concat();
            let database = fresh_database().await.unwrap();
            let pool = query::store::connect(&database.url).await.unwrap();
            project_in_batches(&pool, &events, size, bulk).await;
            assert_eq!(
                live,
                table_digests(&pool).await,
                "batches of {size}, bulk {bulk}, shard 2 first {shard_two_first}"
            );
        }
    }
}

/// `events` ready to be written, as the projector prepares a batch.
fn prepared(events: &[ledger::Event]) -> query::store::Prepared {
    let mut prepared = query::store::Prepared::default();
    for event in events {
        let received = query::connector::Received {
            message: event.clone(),
            encoded: event.encode_to_vec().into(),
        };
        prepared.push(received).unwrap();
    }
    prepared
}

/// Projects `events` (each shard's in seq order) in batches of `size`: batch by batch as the
/// projector does, or as a bulk load does.
async fn project_in_batches(pool: &PgPool, events: &[ledger::Event], size: usize, bulk: bool) {
    let mut load = match bulk {
        true => Some(query::store::BulkLoad::open(pool).await.unwrap()),
        false => None,
    };
    for batch in events.chunks(size) {
        let written = match &mut load {
            Some(load) => load.write(prepared(batch)).await.unwrap(),
            None => query::store::write(pool, prepared(batch)).await.unwrap(),
        };
        assert_eq!(written.len(), batch.len());
    }
    if let Some(load) = load {
        load.finish(pool).await.unwrap();
    }
}

/// Every kind of field the projector copies in PostgreSQL's binary format reads back as written,
/// edge values included.
#[tokio::test]
async fn binary_copy_fields_read_back_as_written() {
    let database = fresh_database().await.unwrap();
    let pool = database.pool().await.unwrap();
    sqlx::query(
        "CREATE TABLE copied (n integer, big bigint, label text, note text, raw bytea,
                              at timestamptz, amount numeric, doc jsonb, ids text[],
                              flag boolean)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let amounts: [i128; 10] = [
        0,
        1,
        -1,
        9_999,
        10_000,
        -100_020_000,
        1_000_000_000_000,
        123_456_789_012_345_678_901_234_567_890,
        i128::MAX,
        i128::MIN,
    ];
    let mut rows = query::copy::CopyRows::default();
    for (n, amount) in amounts.iter().enumerate() {
        let ids: Vec<String> = (0..n).map(|i| format!("acct \"{i}\"\t,{{x}}")).collect();
        rows.int4(-(n as i32))
            .int8(i64::MAX - n as i64)
            .text(&format!("ünïcode\t\\ {n}\n"))
            .optional((n % 2 == 0).then_some("set"))
            .bytes(&[0, 255, n as u8, b'\\'])
            .timestamp(1_764_840_000_123 + n as i64)
            .numeric(*amount)
            .jsonb(&format!("{{\"n\": {n}, \"s\": \"a\\\"b\"}}"))
            .text_array(ids.iter().map(String::as_str))
            .boolean(n % 3 == 0)
            .end_row();
    }
    let mut conn = pool.acquire().await.unwrap();
    let target = query::copy::Target {
        table: "copied",
        columns: "(n, big, label, note, raw, at, amount, doc, ids, flag)",
    };
    rows.write(&mut conn, &target).await.unwrap();
    let read = sqlx::query(
        "SELECT n, big, label, note, raw, (extract(epoch FROM at) * 1000)::bigint,
                amount::text, doc::text, ids, flag FROM copied ORDER BY n DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(read.len(), amounts.len());
    for (n, (row, amount)) in read.iter().zip(amounts).enumerate() {
        assert_eq!(row.get::<i32, _>(0), -(n as i32));
        assert_eq!(row.get::<i64, _>(1), i64::MAX - n as i64);
        assert_eq!(row.get::<String, _>(2), format!("ünïcode\t\\ {n}\n"));
        assert_eq!(
            row.get::<Option<String>, _>(3).as_deref(),
            (n % 2 == 0).then_some("set")
        );
        assert_eq!(row.get::<Vec<u8>, _>(4), [0, 255, n as u8, b'\\']);
        assert_eq!(row.get::<i64, _>(5), 1_764_840_000_123 + n as i64);
        assert_eq!(row.get::<String, _>(6), amount.to_string());
        assert_eq!(
            row.get::<String, _>(7),
            format!("{{\"n\": {n}, \"s\": \"a\\\"b\"}}")
        );
        let ids: Vec<String> = (0..n).map(|i| format!("acct \"{i}\"\t,{{x}}")).collect();
        assert_eq!(row.get::<Vec<String>, _>(8), ids);
        assert_eq!(row.get::<bool, _>(9), n % 3 == 0);
    }
}
