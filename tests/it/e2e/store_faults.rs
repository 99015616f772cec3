//! The store's disk failing: full, or read-only. At startup tollgate refuses with the reason;
//! while serving, paid and prepaid requests fail closed (`503 store_unavailable` with
//! `Retry-After`, the upstream never sees them) while free routes go on, `/readyz` explains and
//! `tollgate_store_up` is 0; once the directory takes writes again tollgate restarts in place
//! (same PID) and every balance, nonce and ledger entry is exactly what was answered.
//!
//! A real full disk: a tmpfs of a few MiB mounted on the store's directory (needs root, as CI
//! runs; elsewhere the tests say so and do nothing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{self, Facilitator, Launch, Sidecar, Tweak, Upstream, Wallet, free_port};
use super::{World, expect_error, policy};

/// A tmpfs mounted at a directory, unmounted on drop.
struct Disk {
    at: PathBuf,
}

impl Disk {
    /// `None` when this user cannot mount (not root): the caller skips.
    fn mount(at: &Path, size: &str) -> Option<Disk> {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            assert_ne!(
                rustix_uid(),
                0,
                "root could not mount a tmpfs at {}",
                at.display()
            );
            eprintln!("skipped: mounting a small disk needs root");
            return None;
        }
        Some(Disk {
            at: at.to_path_buf(),
        })
    }

    /// Fills the disk with a file until it refuses another byte.
    fn fill(&self) {
        use std::io::Write as _;
        let mut file = std::fs::File::create(self.at.join("filler")).unwrap();
        let chunk = [0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.at.join("filler")).unwrap();
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.at)
            .status()
            .unwrap();
        assert!(status.success(), "remount {option}");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn rustix_uid() -> u32 {
    String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn readyz(sidecar: &Sidecar) -> Option<(u16, Value)> {
    let response = harness::client()
        .get(sidecar.ops_url("/readyz"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

async fn store_up(sidecar: &Sidecar) -> Option<String> {
    let metrics = harness::client()
        .get(sidecar.ops_url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_store_up "))
        .map(str::to_string)
}

/// Disk full while serving: refused, explained, recovered in place; nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_paid_and_prepaid_calls_keeps_free_ones_and_recovers_in_place() {
    let dir = harness::scratch_dir("store-full");
    let Some(disk) = Disk::mount(&dir.join("data"), "4m") else {
        return;
    };
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    std::fs::write(dir.join("policy.toll"), policy(&facilitator.url())).unwrap();
    let sidecar = Sidecar::launch(&dir, &upstream.url(), Launch::default()).await;
    let pid = sidecar.child.id();
    let w = World {
        upstream,
        facilitator,
        sidecar,
        dir,
        http: harness::client(),
        wallet: Wallet::new(0x61),
    };

    let (account, key) = w.funded_key(100).await;
    assert_eq!(w.with_key("/metered/before", &key).await.status(), 200);
    assert_eq!(
        w.pay_v2("/paid/before", &Tweak::default()).await.status(),
        200
    );
    let mut debited = 1;

    disk.fill();
    // sled may still have room in a log segment it already holds: the disk is full for the
    // store once a write fails. Calls answered before that were durable.
    let refused = loop {
        let response = w.with_key("/metered/during", &key).await;
        if response.status() == 200 {
            debited += 1;
            assert!(debited < 50, "the store never noticed the disk is full");
            continue;
        }
        break response;
    };
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("5")
    );
    expect_error(refused, 503, "store_unavailable").await;

    let seen = w.upstream.seen();
    let unpaid = w.signed_v2("/paid/during", &Tweak::default()).await;
    expect_error(
        w.send_v2("/paid/during", &unpaid).await,
        503,
        "store_unavailable",
    )
    .await;
    expect_error(
        w.with_key("/metered/during", &key).await,
        503,
        "store_unavailable",
    )
    .await;
    assert_eq!(
        w.upstream.seen(),
        seen,
        "nothing refused reached the upstream"
    );
    assert_eq!(w.get("/free/still").send().await.unwrap().status(), 200);
    assert_eq!(w.upstream.seen(), seen + 1, "free routes go on");

    let (status, ready) = readyz(&w.sidecar).await.unwrap();
    assert_eq!(status, 200, "{ready:#}");
    assert_eq!(ready["status"], "degraded", "{ready:#}");
    assert_eq!(ready["store"]["state"], "failed", "{ready:#}");
    assert!(
        ready["store"]["reason"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{ready:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_up(&w.sidecar).await.as_deref() != Some("0") {
        assert!(
            Instant::now() < deadline,
            "tollgate_store_up never fell to 0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        w.sidecar
            .log()
            .contains("the store cannot write: paid and prepaid requests are refused"),
        "{}",
        w.sidecar.log()
    );

    // Room again: tollgate restarts in place and serves paid calls from the recovered store.
    disk.free();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = readyz(&w.sidecar).await
            && body["status"] == "ready"
            && store_up(&w.sidecar).await.as_deref() == Some("1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate did not recover:\n{}",
            w.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        w.sidecar.child.id(),
        pid,
        "restarted in place, same process"
    );
    assert!(
        w.sidecar
            .log()
            .contains("restarting in place to reopen the store"),
        "{}",
        w.sidecar.log()
    );
    // The listeners may come up one by one: wait for the proxy and the admin API.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", w.sidecar.port))
        .await
        .is_err()
        || tokio::net::TcpStream::connect(("127.0.0.1", w.sidecar.admin_port))
            .await
            .is_err()
    {
        assert!(Instant::now() < deadline, "listeners did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Exactly what was answered: the refused calls cost nothing, the served ones once.
    assert_eq!(w.balance(account).await, 100 - debited);
    assert_eq!(w.with_key("/metered/after", &key).await.status(), 200);
    assert_eq!(w.balance(account).await, 100 - debited - 1);
    // The payment refused while the disk was full was never claimed: it pays now, once.
    assert_eq!(w.send_v2("/paid/during", &unpaid).await.status(), 200);
    expect_error(
        w.send_v2("/paid/during", &unpaid).await,
        402,
        "payment_replayed",
    )
    .await;
    for path in ["/v1/ledger/verify", "/v1/audit"] {
        let (status, report) = w.admin("GET", path, None).await;
        assert_eq!(status, 200, "{path}: {report:#}");
        assert_eq!(report["consistent"], true, "{path}: {report:#}");
    }
    drop(w);
    drop(disk);
}

/// Starts tollgate on a prepared directory and expects it to refuse; returns what it said.
async fn refused_start(dir: &Path) -> String {
    let config = format!(
        "listen: 127.0.0.1:{}\nupstream: http://127.0.0.1:{}\npublic_url: https://api.example.com\npolicies: [policy.toll]\nstore: data\nops:\n  listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port()
    );
    std::fs::write(dir.join("tollgate.yaml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config", "tollgate.yaml"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("TOLLGATE_CONFIG")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate started instead of refusing");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let said = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert_eq!(status.code(), Some(2), "{said}");
    said
}

/// A full or read-only store directory at startup: tollgate refuses before opening a port,
/// naming the directory and what the system said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_full_or_read_only_store_with_the_reason() {
    let dir = harness::scratch_dir("store-refused");
    let Some(disk) = Disk::mount(&dir.join("data"), "1m") else {
        return;
    };
    std::fs::write(dir.join("policy.toll"), policy("http://127.0.0.1:9")).unwrap();

    disk.fill();
    let said = refused_start(&dir).await;
    assert!(
        said.contains("cannot open the store at ") && said.contains("No space left on device"),
        "{said}"
    );

    disk.free();
    disk.remount("ro");
    let said = refused_start(&dir).await;
    assert!(
        said.contains("cannot open the store at ") && said.contains("Read-only file system"),
        "{said}"
    );
    disk.remount("rw");
}
