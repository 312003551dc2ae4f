//! Directory watch: good → generation 1; bad → still 1 with last_error set; fixed → 2.
use mesh_config::ConfigStore;
use std::time::{Duration, Instant};

const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hosts: [HOST], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}\n";

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watch_reload_keeps_last_good() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("istio-egress").join("se.yaml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, GOOD.replace("HOST", "a.example.com")).unwrap();

    let store = ConfigStore::open(dir.path()).unwrap();
    assert_eq!(store.generation(), 1);
    assert!(store.last_error().is_none());
    assert!(store.last_good_load().is_some());
    let first = store.current();
    assert!(first.service_by_host("a.example.com").is_some());
    let mut rx = store.subscribe();
    let _watch = store.watch().unwrap();

    // A bad change: logged, recorded, and the old snapshot keeps serving.
    std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hostz: [x]}\n").unwrap();
    wait_for("last_error", || store.last_error().is_some()).await;
    assert_eq!(store.generation(), 1);
    assert!(std::sync::Arc::ptr_eq(&store.current(), &first));
    let err = store.last_error().unwrap().to_string();
    assert!(
        err.contains("istio-egress/se.yaml:document 1: ServiceEntry istio-egress/s: spec.hostz"),
        "{err}"
    );

    // Fixed: swapped, generation 2, error cleared, subscribers notified.
    std::fs::write(&file, GOOD.replace("HOST", "b.example.com")).unwrap();
    wait_for("generation 2", || store.generation() == 2).await;
    assert!(store.last_error().is_none());
    let snap = store.current();
    assert!(snap.service_by_host("b.example.com").is_some());
    assert!(snap.service_by_host("a.example.com").is_none());
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(
        rx.borrow_and_update()
            .service_by_host("b.example.com")
            .is_some()
    );
}

#[tokio::test]
async fn burst_of_writes_is_debounced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("se.yaml");
    std::fs::write(&file, GOOD.replace("HOST", "h0.example.com")).unwrap();
    let store = ConfigStore::open(dir.path()).unwrap();
    let _watch = store.watch().unwrap();
    for i in 1..=20 {
        std::fs::write(&file, GOOD.replace("HOST", &format!("h{i}.example.com"))).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for("final content", || {
        store.current().service_by_host("h20.example.com").is_some()
    })
    .await;
    // 20 writes within ~100 ms collapse into very few reloads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.generation() <= 4, "generation {}", store.generation());
}

#[test]
fn reload_without_watch_and_invalid_initial_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n",
    )
    .unwrap();
    let err = ConfigStore::open(dir.path()).unwrap_err();
    assert_eq!(err.len(), 1);
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.1}\n",
    )
    .unwrap();
    let store = ConfigStore::open(dir.path()).unwrap();
    assert_eq!(store.reload().unwrap(), 2);
    let embedded = ConfigStore::embedded_default().unwrap();
    assert!(embedded.reload().is_err(), "no directory to reload");
    assert!(embedded.current().service_by_host("aliyun.com").is_some());
}
