use std::path::Path;

use integration_tests::postgres::{PostgresServer, fresh_database};
use sqlx::Row;
use sqlx::migrate::Migrator;

#[tokio::test]
async fn migrations_and_queries_run_against_the_private_server() {
    let database = fresh_database().await.unwrap();
    let pool = database.pool().await.unwrap();
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/smoke");
    Migrator::new(migrations.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();

    sqlx::query("INSERT INTO smoke_balances (account_id, balance) VALUES ($1, $2::NUMERIC)")
        .bind("alice")
        .bind("170141183460469231731687303715884105727") // i128::MAX fits NUMERIC(39, 0).
        .execute(&pool)
        .await
        .unwrap();
    let row =
        sqlx::query("SELECT balance::TEXT AS balance FROM smoke_balances WHERE account_id = $1")
            .bind("alice")
            .fetch_one(&pool)
            .await
            .unwrap();
    let balance: String = row.get("balance");
    assert_eq!(balance.parse::<i128>().unwrap(), i128::MAX);

    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        version.starts_with(char::is_numeric),
        "unexpected version {version}"
    );
}

#[tokio::test]
async fn each_test_gets_its_own_empty_database() {
    let first = fresh_database().await.unwrap();
    let second = fresh_database().await.unwrap();
    assert_ne!(first.name, second.name);

    let first_pool = first.pool().await.unwrap();
    sqlx::query("CREATE TABLE only_in_first (id INT)")
        .execute(&first_pool)
        .await
        .unwrap();
    let second_pool = second.pool().await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'only_in_first'",
    )
    .fetch_one(&second_pool)
    .await
    .unwrap();
    assert_eq!(tables, 0);
}

#[tokio::test]
async fn the_server_listens_only_on_loopback_with_a_throwaway_directory() {
    let server = PostgresServer::shared().unwrap();
    assert!(server.data_dir().starts_with(std::env::temp_dir()));
    let database = server.fresh_database().await.unwrap();
    let pool = database.pool().await.unwrap();
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(listen, "127.0.0.1");
}

#[tokio::test]
async fn text_compares_byte_by_byte_whatever_the_machine_locale() {
    let database = fresh_database().await.unwrap();
    let pool = database.pool().await.unwrap();
    let collation: String =
        sqlx::query_scalar("SELECT datcollate FROM pg_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(collation, "C");
    // Byte order: upper case before lower case, and 'é' (0xC3 0xA9) after 'z'.
    let byte_order: bool = sqlx::query_scalar("SELECT 'B' < 'a' AND 'z' < 'é'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(byte_order);
}
