//! `walletctl status`: the platform's status (`marker::status`) with the read side's projection
//! of each storage shard read from its database, as a table or as JSON.

use marker::status::PlatformStatus;

use crate::{Error, Result};

/// The status of the platform behind `topology`, with the read side in `database_url`.
pub async fn status(topology_replicas: &[String], database_url: &str) -> Result<PlatformStatus> {
    let projected = match query::store::connect(database_url).await {
        Ok(pool) => query::store::applied_seqs(&pool).await.ok(),
        Err(_) => None,
    };
    marker::status::status(topology_replicas, projected.as_ref())
        .await
        .map_err(Error::Setup)
}

/// The status as a table.
pub fn render(status: &PlatformStatus) -> String {
    let mut text = format!(
        "{:<16} {:>7} {:>5} {:>9} {:>10} {:>10} {:>8}\n",
        "group", "leader", "term", "applied", "in-flight", "projected", "lag"
    );
    let dash = || "-".to_string();
    for group in &status.groups {
        text.push_str(&format!(
            "{:<16} {:>7} {:>5} {:>9} {:>10} {:>10} {:>8}\n",
            format!("{} {}", group.kind, group.group_id),
            group
                .leader_node_id
                .map_or_else(|| "none".to_string(), |id| id.to_string()),
            group.term.map_or_else(dash, |t| t.to_string()),
            group.applied_seq,
            group.in_flight.map_or_else(dash, |n| n.to_string()),
            group
                .projection
                .as_ref()
                .map_or_else(dash, |p| p.applied_seq.to_string()),
            group
                .projection
                .as_ref()
                .map_or_else(dash, |p| p.lag_events.to_string()),
        ));
        for replica in &group.replicas {
            text.push_str(&format!(
                "    {:<24} {:<10} {}\n",
                replica.address,
                if replica.reachable {
                    replica.state.as_str()
                } else {
                    "unreachable"
                },
                replica
                    .applied_seq
                    .map_or_else(String::new, |seq| format!("applied {seq}")),
            ));
        }
    }
    text
}
