//! TLS to Postgres: a throwaway cluster with `ssl = on` and a certificate signed by a CA of
//! the test's own (made with the `openssl` command, which `.ci/run` installs), reached with
//! each `sslmode`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use proclog::local_pg::{LocalPostgres, LocalPostgresOptions};
use proclog::pg::{DatabaseTarget, ListenerStatus, TlsMode};
use proclog::{ProcessError, Proclog};

/// A CA, a server certificate it signed (for `localhost` only), and a second, unrelated CA.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl command is installed");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=proclog test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        // Self-signed and X.509 version 1 (no extensions), as `CREATE EXTENSION citus` makes
        // one: OpenSSL 3.0's `x509 -req` without `-extfile` writes version 1.
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "v1.key",
            "-out",
            "v1.csr",
        ]);
        run(&[
            "x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-days", "2", "-out", "v1.crt",
        ]);
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", "v1.crt"])
            .current_dir(dir)
            .output()
            .expect("openssl x509 -text");
        assert!(
            String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"),
            "the self-signed certificate is X.509 version 1"
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// Whether the `openssl` command is there (it makes the certificates). Without it the tests
/// say so and pass, except under `CI`, where it is installed and required.
fn have_openssl() -> bool {
    let found = Command::new("openssl").arg("version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "the openssl command is required under CI"
        );
        eprintln!("skipped: the openssl command is not installed");
    }
    found
}

/// A cluster serving TLS with the CA-signed certificate, and a database `tls` in it.
async fn tls_cluster() -> (LocalPostgres, Certificates) {
    tls_cluster_serving("server", &[]).await
}

/// A cluster serving TLS with certificate `name` (`<name>.crt`, `<name>.key`; the files
/// owned by the server's account, the key readable by it only, as Postgres demands) and the
/// extra `settings`, and a database `tls` in it.
async fn tls_cluster_serving(name: &str, settings: &[&str]) -> (LocalPostgres, Certificates) {
    let mut cluster = LocalPostgres::start(&LocalPostgresOptions::default()).unwrap();
    let dir = cluster.dir().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let certificates = Certificates::make(&dir);
    let owner = std::fs::metadata(cluster.dir()).unwrap();
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    for file in [crt.as_str(), key.as_str(), "ca.crt"] {
        let path = dir.join(file);
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
    std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid())).unwrap();
    let (admin, connection) =
        tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    // One statement at a time: ALTER SYSTEM cannot run in a (multi-statement) transaction.
    for statement in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            certificates.path(&crt)
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            certificates.path(&key)
        ),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "CREATE DATABASE tls".to_owned(),
    ]
    .into_iter()
    .chain(
        settings
            .iter()
            .map(|setting| format!("ALTER SYSTEM SET {setting}")),
    ) {
        admin.batch_execute(&statement).await.unwrap();
    }
    drop(admin);
    // A restart, not a reload: the server serves TLS once it accepts connections again.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_server();
        cluster.start_server().map(|()| cluster)
    })
    .await
    .unwrap()
    .unwrap();
    (cluster, certificates)
}

fn url(cluster: &LocalPostgres, host: &str, query: &str) -> String {
    format!("postgres://proclog@{host}:{}/tls?{query}", cluster.port())
}

/// Whether the pool's connection uses TLS, from the server's side.
async fn encrypted(url: &str) -> Result<bool, ProcessError> {
    let pool = proclog::pg::connect_pool(url, 1)?;
    let client = pool
        .get()
        .await
        .map_err(|err| ProcessError::Unavailable(format!("{err:?}")))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|err| ProcessError::Database(err.to_string()))?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_connects_or_refuses_as_documented() {
    if !have_openssl() {
        return;
    }
    let (cluster, certs) = tls_cluster().await;
    let ca = certs.path("ca.crt");
    let other_ca = certs.path("other-ca.crt");

    // The certificate is checked: the right CA and host name are accepted.
    let full = url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert!(
        encrypted(&full).await.unwrap(),
        "verify-full connects over TLS"
    );

    // A CA that did not sign the server's certificate is refused.
    let wrong_ca = url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other_ca}"),
    );
    let refused = encrypted(&wrong_ca).await;
    match &refused {
        Err(ProcessError::Unavailable(message)) => {
            assert!(
                message.contains("certificate") || message.contains("Certificate"),
                "{message}"
            )
        }
        other => panic!("a certificate from an untrusted CA must be refused, got {other:?}"),
    }
    let refused = encrypted(&url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={other_ca}"),
    ))
    .await;
    assert!(
        refused.is_err(),
        "verify-ca checks the chain too: {refused:?}"
    );

    // The certificate names `localhost`, not 127.0.0.1: verify-full refuses the address,
    // verify-ca (chain only) accepts it, and `require` with a CA file means verify-ca.
    let by_address = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert!(
        encrypted(&by_address).await.is_err(),
        "host name mismatch refused"
    );
    let chain_only = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    assert!(encrypted(&chain_only).await.unwrap());
    let require_with_ca = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={ca}"),
    );
    assert_eq!(
        DatabaseTarget::parse(&require_with_ca).unwrap().tls_mode(),
        TlsMode::VerifyCa
    );
    assert!(encrypted(&require_with_ca).await.unwrap());
    let require_other = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={other_ca}"),
    );
    assert!(encrypted(&require_other).await.is_err());

    // Without a CA: `require` and `prefer` encrypt without checking; `disable` does not.
    assert!(
        encrypted(&url(&cluster, "127.0.0.1", "sslmode=require"))
            .await
            .unwrap()
    );
    assert!(
        encrypted(&url(&cluster, "127.0.0.1", "sslmode=prefer"))
            .await
            .unwrap()
    );
    assert!(
        encrypted(&url(&cluster, "127.0.0.1", "")).await.unwrap(),
        "prefer is the default"
    );
    assert!(
        !encrypted(&url(&cluster, "127.0.0.1", "sslmode=disable"))
            .await
            .unwrap()
    );
    cluster.stop().unwrap();
}

/// `CREATE EXTENSION citus` serves a self-signed X.509 version 1 certificate; libpq takes it
/// under `prefer` and `require`, and so does proclog, over TLS 1.3 and TLS 1.2 (whose
/// handshake signatures are checked apart), while the checking modes refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_version_1_certificate_is_taken_by_prefer_and_require() {
    if !have_openssl() {
        return;
    }
    for settings in [&[][..], &["ssl_max_protocol_version = 'TLSv1.2'"][..]] {
        let (cluster, certs) = tls_cluster_serving("v1", settings).await;
        for query in ["", "sslmode=prefer", "sslmode=require"] {
            assert!(
                encrypted(&url(&cluster, "localhost", query))
                    .await
                    .unwrap_or_else(|err| panic!("{query:?} with {settings:?}: {err}")),
                "{query:?} with {settings:?} connects over TLS"
            );
        }
        // Checking modes: the certificate is not signed by the CA given.
        let checked = url(
            &cluster,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.crt")),
        );
        assert!(encrypted(&checked).await.is_err(), "{settings:?}");
        // The whole stack (pool, listener, migrations) comes up under the default mode.
        let stack = Proclog::builder(url(&cluster, "localhost", ""))
            .pod_id("tls-v1-pod")
            .start()
            .await
            .expect("the stack starts on a version 1 certificate");
        assert_eq!(stack.listener_ready().await, ListenerStatus::Listening);
        stack.shutdown().await;
        cluster.stop().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_stack_connects_with_verify_full_listener_included() {
    if !have_openssl() {
        return;
    }
    let (cluster, certs) = tls_cluster().await;
    let full = url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.crt")),
    );
    let stack = Proclog::builder(&full)
        .pod_id("tls-pod")
        .start()
        .await
        .expect("the stack starts over verify-full TLS");
    assert_eq!(stack.listener_ready().await, ListenerStatus::Listening);
    // Every connection the pod opened (pool, leases, notifier, listener) is encrypted.
    let client = stack.pool().unwrap().get().await.unwrap();
    let rows = client
        .query(
            "SELECT a.application_name, s.ssl
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name LIKE 'proclog-%tls-pod'",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert!(
        names.iter().any(|name| name == "proclog-listener-tls-pod"),
        "the listener is connected: {names:?}"
    );
    assert!(
        names.iter().any(|name| name == "proclog-tls-pod"),
        "{names:?}"
    );
    for row in &rows {
        let (name, ssl): (String, bool) = (row.get(0), row.get(1));
        assert!(ssl, "{name} is not encrypted");
    }
    drop(client);
    stack.shutdown().await;

    // The same stack with a CA that did not sign the certificate never starts.
    let wrong = url(
        &cluster,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.path("other-ca.crt")
        ),
    );
    let refused = Proclog::builder(&wrong)
        .pod_id("tls-pod-wrong-ca")
        .startup_timeout(std::time::Duration::from_millis(500))
        .start()
        .await;
    assert!(
        refused.is_err(),
        "an untrusted certificate must stop the start"
    );
    cluster.stop().unwrap();
}
