use std::path::Path;

fn shell(script: &str) -> Vec<String> {
    vec!["-c".into(), script.into()]
}

#[tokio::test]
async fn a_service_is_ready_when_it_prints_its_address() {
    let service = integration_tests::process::spawn(
        Path::new("/bin/sh"),
        &shell("echo starting; echo 'ready 127.0.0.1:4242'; exec sleep 30"),
    )
    .await
    .unwrap();
    assert_eq!(service.address(), "127.0.0.1:4242");
}

#[tokio::test]
async fn a_service_that_exits_before_it_is_ready_is_an_error() {
    let result =
        integration_tests::process::spawn(Path::new("/bin/sh"), &shell("echo crashing; exit 3"))
            .await;
    assert!(result.is_err());
}

#[tokio::test]
async fn a_killed_service_is_gone() {
    let mut service = integration_tests::process::spawn(
        Path::new("/bin/sh"),
        &shell("echo 'ready -'; exec sleep 30"),
    )
    .await
    .unwrap();
    let pid = service.pid();
    service.kill().await.unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}
