//! The deployment files agree with the binary: the Kubernetes base renders offline
//! (`kubectl kustomize`) and its ports, probes, environment names and arguments are ones
//! `proclog` accepts; the compose file and the Dockerfile use the same names.
//!
//! Needs `kubectl` (Debian's package); without it the Kubernetes test says so and passes,
//! except under `CI`, where it fails.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_proclog");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `proclog <command> --help`.
fn help(command: &[&str]) -> String {
    let output = Command::new(BINARY)
        .args(command)
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success(), "proclog {command:?} --help failed");
    String::from_utf8(output.stdout).unwrap()
}

/// The environment variables a command reads (`[env: NAME=...]` in its help).
fn accepted_env(command: &[&str]) -> BTreeSet<String> {
    help(command)
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap_or_default().to_owned())
        .collect()
}

fn rendered_kubernetes() -> Option<Vec<Value>> {
    rendered("deploy/kubernetes")
}

/// `kubectl kustomize` of the directory `dir` of the repository, as documents.
fn rendered(dir: &str) -> Option<Vec<Value>> {
    let output = match Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl is required under CI: {err}"
            );
            eprintln!("skipped: kubectl is not installed ({err})");
            return None;
        }
    };
    assert!(
        output.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = String::from_utf8(output.stdout).unwrap();
    Some(serde_saphyr::from_multiple::<Value>(&yaml).expect("the rendered YAML parses"))
}

fn by_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = documents.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_kubernetes_base_matches_what_the_binary_accepts() {
    let Some(documents) = rendered_kubernetes() else {
        return;
    };
    let kinds: BTreeSet<&str> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        "ConfigMap",
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
    ]
    .into();
    assert_eq!(kinds, expected);
    let pod_env = accepted_env(&["pod"]);
    let migrate_env = accepted_env(&["migrate"]);

    // The ConfigMap only sets variables `proclog pod` reads; its listen port is the
    // container's port.
    let config = &by_kind(&documents, "ConfigMap")["data"];
    let config = config.as_object().unwrap();
    for name in config.keys() {
        assert!(
            pod_env.contains(name),
            "ConfigMap sets {name}, which `proclog pod` does not read"
        );
    }
    let listen = config["PROCLOG_LISTEN"].as_str().unwrap();
    let listen_port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();

    let deployment = by_kind(&documents, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod_spec = &deployment["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(args[0], "pod", "the Deployment runs pods");
    help(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let port = &container["ports"][0];
    assert_eq!(port["containerPort"].as_u64(), Some(listen_port));
    let port_name = port["name"].as_str().unwrap();
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port_name || get["port"].as_u64() == Some(listen_port),
            "{probe} asks the container's port"
        );
    }
    for env in container["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            pod_env.contains(name),
            "the Deployment sets {name}, which `proclog pod` does not read"
        );
    }
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|env| env["name"] == "DATABASE_URL"
                && env["valueFrom"]["secretKeyRef"]["name"] == "proclog-db"),
        "the database URL comes from the Secret"
    );
    // Safe by default: the API token is required (a Secret key that must exist), and a
    // NetworkPolicy admits only labelled clients to the pods.
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|env| env["name"] == "PROCLOG_API_TOKEN"
                && env["valueFrom"]["secretKeyRef"]["name"] == "proclog-api"
                && env["valueFrom"]["secretKeyRef"]["optional"] != true),
        "the API token comes from a Secret and is required"
    );
    assert!(
        !config.contains_key("PROCLOG_INSECURE_NO_TOKEN")
            && !config.contains_key("PROCLOG_DEMO_ENGINES"),
        "no open API and no demo engines in the base"
    );
    let policy = by_kind(&documents, "NetworkPolicy");
    assert_eq!(strings(&policy["spec"]["policyTypes"]), ["Ingress"]);
    // The drain (grace + hard stop) fits in the termination grace period.
    let drain_ms: u64 = ["PROCLOG_GRACE_MS", "PROCLOG_HARD_STOP_MS"]
        .iter()
        .map(|name| config[*name].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    let grace_s = pod_spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace_s * 1000 > drain_ms,
        "terminationGracePeriodSeconds {grace_s} s <= drain {drain_ms} ms"
    );
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"].is_object());

    let service = by_kind(&documents, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service selects the pods");
    }
    let budget = by_kind(&documents, "PodDisruptionBudget");
    for (key, value) in budget["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&labels[key], value, "the budget selects the pods");
    }

    for (key, value) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&labels[key], value, "the NetworkPolicy selects the pods");
    }

    // The Job migrates as the schema's owner and grants the pods' role.
    let job = by_kind(&documents, "Job");
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&migrate["args"]);
    assert_eq!(args, ["migrate", "--writer-role", "proclog_pod"]);
    help(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        migrate["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|env| env["name"] == "DATABASE_URL"
                && env["valueFrom"]["secretKeyRef"]["key"] == "owner-database-url"),
        "the Job connects as the owner"
    );
    for env in migrate["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            migrate_env.contains(name),
            "the Job sets {name}, which `proclog migrate` does not read"
        );
    }
}

#[test]
fn compose_and_dockerfile_use_names_the_binary_accepts() {
    let pod_env = accepted_env(&["pod"]);
    let compose = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    let compose: Value = serde_saphyr::from_str(&compose).unwrap();
    let pod = &compose["services"]["pod"];
    let command = strings(&pod["command"]);
    assert_eq!(command[0], "pod");
    help(&command.iter().map(String::as_str).collect::<Vec<_>>());
    let listen = command
        .iter()
        .skip_while(|arg| *arg != "--listen")
        .nth(1)
        .expect("the compose pods listen on an explicit address");
    let port = listen.rsplit(':').next().unwrap();
    for mapping in strings(&pod["ports"]) {
        assert!(
            mapping.ends_with(&format!(":{port}")),
            "{mapping} publishes the API port"
        );
    }
    for name in pod["environment"].as_object().unwrap().keys() {
        // NO_COLOR is read by the logger, not by clap.
        assert!(
            pod_env.contains(name) || name == "NO_COLOR",
            "compose sets {name}, which `proclog pod` does not read"
        );
    }
    // Safe by default: secrets required, pods as the writer role, the owner migrates.
    let raw = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    for secret in [
        "POSTGRES_PASSWORD",
        "PROCLOG_OWNER_PASSWORD",
        "PROCLOG_POD_PASSWORD",
        "PROCLOG_READER_PASSWORD",
        "PROCLOG_API_TOKEN",
    ] {
        assert!(
            raw.contains(&format!("${{{secret}:?")),
            "{secret} is required"
        );
        assert!(
            !raw.contains(&format!("${{{secret}:-")),
            "{secret} has no default"
        );
    }
    let url = pod["environment"]["DATABASE_URL"].as_str().unwrap();
    assert!(url.starts_with("postgres://proclog_pod:"), "{url}");
    let migrate = &compose["services"]["migrate"];
    let command = strings(&migrate["command"]);
    assert_eq!(command[0], "migrate");
    help(&command.iter().map(String::as_str).collect::<Vec<_>>());
    let url = migrate["environment"]["DATABASE_URL"].as_str().unwrap();
    assert!(url.starts_with("postgres://proclog_owner:"), "{url}");
    for ignore in [".gitignore", ".dockerignore"] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(ignore)).unwrap();
        assert!(
            text.lines().any(|line| line == ".env"),
            "{ignore} ignores .env"
        );
    }
    let health = strings(&pod["healthcheck"]["test"]);
    assert_eq!(health[..2], ["CMD", "proclog"]);
    help(&[health[2].as_str()]);
    assert!(
        health
            .iter()
            .any(|arg| arg.ends_with(&format!(":{port}/readyz")))
    );

    // The Dockerfile's health check is a command the binary has, on the port it listens on.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let check = dockerfile
        .lines()
        .find(|line| line.trim_start().starts_with("CMD [\"proclog\""))
        .expect("a HEALTHCHECK CMD running proclog");
    assert!(check.contains("\"probe\""), "{check}");
    help(&["probe"]);
    assert!(dockerfile.contains("ENV PROCLOG_LISTEN=0.0.0.0:8080"));
    assert!(check.contains("http://127.0.0.1:8080/readyz"));
    assert!(dockerfile.contains("CMD [\"pod\"]"));
    assert!(dockerfile.contains("USER 10001"));
}

/// The Citus overlay is the base with the database URLs read from `proclog-citus-db`: the
/// same documents otherwise, and no reference to the base's database Secret left.
#[test]
fn the_citus_overlay_is_the_base_pointed_at_the_coordinator() {
    let (Some(base), Some(citus)) = (
        rendered("deploy/kubernetes"),
        rendered("deploy/kubernetes-citus"),
    ) else {
        return;
    };
    // Patched lists (env) come out in another order: compare them sorted by name.
    let base_text = serde_json::to_string(&sorted_by_name(base)).unwrap();
    let citus_text = serde_json::to_string(&sorted_by_name(citus)).unwrap();
    assert!(
        !citus_text.contains("\"proclog-db\""),
        "no reference to proclog-db is left"
    );
    assert_eq!(
        citus_text.matches("\"proclog-citus-db\"").count(),
        base_text.matches("\"proclog-db\"").count(),
        "every reference moved to proclog-citus-db"
    );
    assert_eq!(
        citus_text.replace("\"proclog-citus-db\"", "\"proclog-db\""),
        base_text,
        "nothing else differs"
    );
}

/// `documents` with every list of named items sorted by name, recursively.
fn sorted_by_name(documents: Vec<Value>) -> Vec<Value> {
    fn sort(value: &mut Value) {
        match value {
            Value::Array(items) => {
                items.iter_mut().for_each(sort);
                if items.iter().all(|item| item["name"].is_string()) {
                    items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                }
            }
            Value::Object(map) => map.values_mut().for_each(sort),
            _ => {}
        }
    }
    documents
        .into_iter()
        .map(|mut document| {
            sort(&mut document);
            document
        })
        .collect()
}
