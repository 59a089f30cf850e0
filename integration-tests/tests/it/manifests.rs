//! The Kubernetes manifests in `deploy/k8s` against the binaries they run: every flag and
//! environment variable a container passes is one its binary accepts (read from its `--help`),
//! every address names a Service with that port (and, for a pod address, a StatefulSet pod that
//! exists), every ConfigMap and Secret key a container reads exists, every listen port is a
//! declared container port, and every Service selects pods that serve its target port.
//! The YAML is read with PyYAML from the API fuzzer's environment (installed by the test script).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every document of every manifest, as JSON.
fn documents() -> Vec<Value> {
    let fuzzer = std::env::var("SCHEMATHESIS_BIN")
        .expect("SCHEMATHESIS_BIN is set by scripts/setup.sh (run the tests with scripts/test.sh)");
    let python = PathBuf::from(fuzzer).with_file_name("python");
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let output = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        ])
        .args(&files)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn texts(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `binary`, its arguments and the environment variables a `sh -c` wrapper sets.
fn invocation(container: &Value) -> (String, Vec<String>, Vec<String>) {
    let command = texts(&container["command"]);
    let args = texts(&container["args"]);
    if command == ["/bin/sh", "-c"] {
        let script = &args[0];
        let (assignments, rest) = script.split_once("exec ").expect("the wrapper execs");
        let set: Vec<String> = assignments
            .split_whitespace()
            .filter_map(|word| word.split_once('=').map(|(name, _)| name.to_string()))
            .collect();
        let mut words = rest.split_whitespace().map(str::to_string);
        let binary = words.next().unwrap();
        return (binary, words.collect(), set);
    }
    (command[0].clone(), args, Vec::new())
}

/// Every `host:port` in `text` that names a cluster address (not a bind address, not a URL).
fn addresses(text: &str) -> Vec<(String, u16)> {
    if text.contains("://") {
        return Vec::new();
    }
    text.split([',', ' ', '='])
        .filter_map(|part| part.rsplit_once(':'))
        .filter(|(host, _)| !host.is_empty() && host.chars().next().unwrap().is_ascii_lowercase())
        .filter_map(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
        .collect()
}

fn check_address(docs: &[Value], host: &str, port: u16) {
    let (pod, service) = match host.split_once('.') {
        Some((pod, service)) => (Some(pod), service),
        None => (None, host),
    };
    let svc = named(docs, "Service", service).unwrap_or_else(|| panic!("no Service {service}"));
    let ports: Vec<u64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert!(
        ports.contains(&u64::from(port)),
        "{host}:{port}: {service} serves {ports:?}"
    );
    if let Some(pod) = pod {
        let (set, ordinal) = pod.rsplit_once('-').unwrap();
        let set = named(docs, "StatefulSet", set).unwrap_or_else(|| panic!("no StatefulSet {set}"));
        assert_eq!(set["spec"]["serviceName"], service, "{host}");
        let ordinal: u64 = ordinal.parse().unwrap();
        assert!(
            ordinal < set["spec"]["replicas"].as_u64().unwrap(),
            "{host}: no such pod"
        );
    }
}

fn help(binary: &str, args: &[String]) -> String {
    // The subcommand is the leading words that are not flags.
    let subcommand: Vec<&String> = args.iter().take_while(|a| !a.starts_with('-')).collect();
    let output = std::process::Command::new(deploy::process::workspace_binary(binary))
        .args(&subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{binary} {subcommand:?} --help: {output:?}"
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_manifest_reference_matches_what_the_binaries_accept() {
    let docs = documents();
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| ["StatefulSet", "Deployment", "Job"].contains(&d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        workloads.len(),
        8,
        "topology, 2 storage, 2 coordinator, query, gateway, job"
    );
    let mut binaries = BTreeSet::new();
    for workload in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        for container in pod["containers"].as_array().unwrap() {
            let (binary, args, wrapper_env) = invocation(container);
            binaries.insert(binary.clone());
            let help = help(&binary, &args);
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("{flag} ")),
                    "{binary} does not accept {flag}"
                );
            }
            let env: Vec<&Value> = container["env"]
                .as_array()
                .map_or(Vec::new(), |e| e.iter().collect());
            let names = env
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .chain(wrapper_env);
            for name in names {
                assert!(
                    help.contains(&format!("[env: {name}=")),
                    "{binary} reads no {name}"
                );
            }
            let ports: Vec<u64> = container["ports"].as_array().map_or(Vec::new(), |p| {
                p.iter()
                    .map(|p| p["containerPort"].as_u64().unwrap())
                    .collect()
            });
            let mut values: Vec<String> = args.clone();
            for variable in &env {
                if let Some(value) = variable["value"].as_str() {
                    values.push(value.to_string());
                    if variable["name"].as_str().unwrap().ends_with("LISTEN") {
                        let port: u64 = value.rsplit_once(':').unwrap().1.parse().unwrap();
                        assert!(
                            ports.contains(&port),
                            "{binary} listens on {port}, not declared"
                        );
                    }
                }
                for (kind, reference) in [
                    ("ConfigMap", &variable["valueFrom"]["configMapKeyRef"]),
                    ("Secret", &variable["valueFrom"]["secretKeyRef"]),
                ] {
                    if let Some(name) = reference["name"].as_str() {
                        let source =
                            named(&docs, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"));
                        let key = reference["key"].as_str().unwrap();
                        let has = |field: &str| !source[field][key].is_null();
                        assert!(
                            has("data") || has("stringData"),
                            "{kind} {name} has no {key}"
                        );
                    }
                }
            }
            if let Some(listen) = args.iter().position(|a| a == "--listen") {
                let port: u64 = args[listen + 1]
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .parse()
                    .unwrap();
                assert!(
                    ports.contains(&port),
                    "{binary} listens on {port}, not declared"
                );
            }
            for value in &values {
                for (host, port) in addresses(value) {
                    check_address(&docs, &host, port);
                }
            }
        }
    }
    assert_eq!(
        binaries.into_iter().collect::<Vec<_>>(),
        [
            "access-gateway",
            "auticuro",
            "marker",
            "marker-topology",
            "query",
            "walletctl"
        ]
    );
    for config in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        for value in config["data"].as_object().unwrap().values() {
            for (host, port) in addresses(value.as_str().unwrap()) {
                check_address(&docs, &host, port);
            }
        }
    }
    // Every Service selects a pod template that serves its target port.
    for service in docs.iter().filter(|d| d["kind"] == "Service") {
        let selector = service["spec"]["selector"].as_object().unwrap();
        let pods: Vec<&Value> = workloads
            .iter()
            .map(|w| &w["spec"]["template"])
            .filter(|t| {
                selector
                    .iter()
                    .all(|(k, v)| t["metadata"]["labels"][k] == *v)
            })
            .collect();
        let name = &service["metadata"]["name"];
        assert!(!pods.is_empty(), "Service {name} selects no pod");
        for port in service["spec"]["ports"].as_array().unwrap() {
            let target = port
                .get("targetPort")
                .unwrap_or(&port["port"])
                .as_u64()
                .unwrap();
            let served = pods.iter().any(|pod| {
                pod["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| {
                        c["ports"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|p| p["containerPort"] == target))
                    })
            });
            assert!(served, "Service {name}: no selected pod serves {target}");
        }
    }
}
