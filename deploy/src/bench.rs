//! `walletctl bench`: runs the benchmark programs (`bench-storage`, `bench-coordinator`,
//! `bench-gateway`, `bench-query`, built next to `walletctl`), each printing its own progress,
//! then prints one table of every measured phase and one JSON document with every report.

use std::path::PathBuf;

use serde_json::Value;

use crate::process::workspace_binary;
use crate::{Error, Result, io_error};

pub const WORKLOADS: [&str; 4] = ["storage", "coordinator", "gateway", "query"];

/// One measured phase of a report: any object with a throughput and latency quantiles.
struct Row {
    workload: String,
    phase: String,
    per_second: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

fn rows(workload: &str, value: &Value, found: &mut Vec<Row>) {
    match value {
        Value::Object(map) => {
            if let (Some(per_second), Some(p50), Some(p99), Some(p999)) = (
                map.get("operations_per_second").and_then(Value::as_f64),
                map.get("p50_ms").and_then(Value::as_f64),
                map.get("p99_ms").and_then(Value::as_f64),
                map.get("p999_ms").and_then(Value::as_f64),
            ) {
                found.push(Row {
                    workload: workload.to_string(),
                    phase: map
                        .get("phase")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    per_second,
                    p50,
                    p99,
                    p999,
                });
            }
            for child in map.values() {
                rows(workload, child, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| rows(workload, item, found)),
        _ => {}
    }
}

/// Runs each workload with `args`; returns every report by workload.
pub async fn run(workloads: &[String], args: &[String]) -> Result<Value> {
    let dir = tempfile_dir()?;
    let mut reports = serde_json::Map::new();
    let mut table = Vec::new();
    for workload in workloads {
        if !WORKLOADS.contains(&workload.as_str()) {
            return Err(Error::Setup(format!(
                "unknown workload {workload:?} (one of {})",
                WORKLOADS.join(", ")
            )));
        }
        let json = dir.join(format!("{workload}.json"));
        eprintln!("== bench-{workload}");
        let status = tokio::process::Command::new(workspace_binary(&format!("bench-{workload}")))
            .args(args)
            .arg("--json")
            .arg(&json)
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .map_err(io_error(format!("running bench-{workload}")))?;
        if !status.success() {
            return Err(Error::Setup(format!("bench-{workload} failed ({status})")));
        }
        let text = std::fs::read_to_string(&json).map_err(io_error("reading a report"))?;
        let report: Value = serde_json::from_str(&text)
            .map_err(|error| Error::Setup(format!("bench-{workload}'s report: {error}")))?;
        rows(workload, &report, &mut table);
        reports.insert(workload.clone(), report);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{:<12} {:<28} {:>12} {:>9} {:>9} {:>9}",
        "workload", "phase", "ops/s", "p50 ms", "p99 ms", "p999 ms"
    );
    for row in &table {
        println!(
            "{:<12} {:<28} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
            row.workload, row.phase, row.per_second, row.p50, row.p99, row.p999
        );
    }
    Ok(Value::Object(reports))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("walletctl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_error("creating a report directory"))?;
    Ok(dir)
}
