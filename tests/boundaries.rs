//! The boundaries ARCHITECTURE.md states, as "nevers", checked on the sources: a change that
//! crosses one fails here, not in a review.
//!
//! - Nothing under `src/pod/`, `src/http/` or `src/watch/` sees a connection pool or a
//!   Postgres client, or holds SQL text: only the store (`src/pg/`) sends SQL.
//! - Nothing under `src/pod/` imports `http`: HTTP is a face over a pod, not part of it.
//! - Nothing outside `src/cli/` and `src/main.rs` uses the command line's crates, and the
//!   library's core uses none of the HTTP crates (they are behind the `http` feature).

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir` (relative to the crate root).
fn sources(dir: &str) -> Vec<PathBuf> {
    fn walk(path: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(path).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    let path = Path::new(ROOT).join(dir);
    if path.is_dir() {
        walk(&path, &mut out);
    } else {
        out.push(path);
    }
    out
}

/// The code of a file without its comments (line comments only: the sources use no block
/// comments), so that documentation may name what code may not use.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines of `dirs` whose code contains any of `needles`, as `file:line: text`.
fn offenders(dirs: &[&str], needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for dir in dirs {
        for path in sources(dir) {
            for (n, line) in code(&path).lines().enumerate() {
                if needles.iter().any(|needle| line.contains(needle)) {
                    let relative = path.strip_prefix(ROOT).unwrap_or(&path).display();
                    found.push(format!("{relative}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn only_the_store_sends_sql() {
    let found = offenders(
        &["src/pod", "src/http", "src/watch"],
        &[
            "Pool",
            "deadpool",
            "tokio_postgres",
            "\"SELECT ",
            "\"INSERT ",
            "\"UPDATE ",
            "\"DELETE ",
            "WITH ",
            "proclog.processes",
            "proclog.events",
            "proclog.pods",
        ],
    );
    assert!(
        found.is_empty(),
        "SQL or a pool outside the store:\n{}",
        found.join("\n")
    );
}

#[test]
fn nothing_under_pod_imports_http() {
    let found = offenders(
        &["src/pod"],
        &["crate::http", "super::http", "axum", "hyper"],
    );
    assert!(
        found.is_empty(),
        "the pod depends on its HTTP face:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_library_core_uses_no_http_or_cli_crate() {
    let core = [
        "src/lib.rs",
        "src/model.rs",
        "src/store.rs",
        "src/registry.rs",
        "src/memory",
        "src/queue.rs",
        "src/metrics.rs",
        "src/stack.rs",
        "src/pod_services.rs",
        "src/tasks.rs",
        "src/pod",
        "src/pg",
        "src/watch",
        "src/testing",
    ];
    let found = offenders(
        &core,
        &[
            "axum",
            "hyper",
            "tower",
            "clap",
            "reqwest",
            "tracing_subscriber",
            "utoipa::",
        ],
    )
    .into_iter()
    // Derives of the OpenAPI schema, compiled only with the `http` feature.
    .filter(|line| !line.contains("cfg_attr(feature = \"http\""))
    .collect::<Vec<_>>();
    assert!(
        found.is_empty(),
        "the library core uses a crate of the http or cli feature:\n{}",
        found.join("\n")
    );
}
