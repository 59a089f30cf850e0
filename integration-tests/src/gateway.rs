//! An access gateway process over a platform started with a topology, with its own fresh
//! database, the query service it reads activity feeds from (`query serve` on the same
//! database), and an HTTP client for it.

use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::platform::Platform;
use crate::postgres::{TestDatabase, fresh_database};
use crate::process::{ServiceProcess, workspace_binary};
use crate::{HarnessError, Result};

pub struct Gateway {
    process: ServiceProcess,
    /// The query service (projector and account queries) the gateway uses.
    pub query: ServiceProcess,
    topology: String,
    extra_args: Vec<String>,
    pub database: TestDatabase,
    pub url: String,
    client: Client,
}

/// One HTTP answer: status, headers and the JSON body (`Null` when there is none).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The problem `type` of an error answer.
    pub fn problem_type(&self) -> &str {
        self.body["type"].as_str().unwrap_or("")
    }

    pub fn text(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {:?}", self.body))
            .to_string()
    }
}

impl Gateway {
    pub async fn start(platform: &Platform) -> Result<Gateway> {
        Self::start_with(platform, &[]).await
    }

    /// A gateway with extra `serve` arguments (limits, timeouts).
    pub async fn start_with(platform: &Platform, extra_args: &[&str]) -> Result<Gateway> {
        let topology = platform
            .topology
            .as_ref()
            .ok_or_else(|| {
                HarnessError::Setup("the gateway needs a platform with a topology".into())
            })?
            .addresses();
        let database = fresh_database().await?;
        let query_args = [
            "serve",
            "--database-url",
            &database.url,
            "--topology",
            &topology,
        ]
        .map(String::from);
        let query = crate::process::spawn(&workspace_binary("query"), &query_args).await?;
        let mut extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        extra_args.extend(["--query".to_string(), query.address().to_string()]);
        let process = Self::spawn(&database, &topology, &extra_args).await?;
        let gateway = Gateway {
            url: format!("http://{}", process.address()),
            process,
            query,
            topology,
            extra_args,
            database,
            client: Client::new(),
        };
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    async fn spawn(
        database: &TestDatabase,
        topology: &str,
        extra_args: &[String],
    ) -> Result<ServiceProcess> {
        let mut args = [
            "--database-url",
            &database.url,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--topology",
            topology,
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra_args);
        crate::process::spawn(&workspace_binary("access-gateway"), &args).await
    }

    async fn wait_ready(&self) -> Result<()> {
        for _ in 0..200 {
            if let Ok(response) = self.client.get(format!("{}/readyz", self.url)).send().await
                && response.status() == StatusCode::OK
            {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(HarnessError::Setup("the gateway never became ready".into()))
    }

    /// Kills the gateway (`kill -9`) and starts a new one on the same database and topology.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.kill().await?;
        self.process = Self::spawn(&self.database, &self.topology, &self.extra_args).await?;
        self.url = format!("http://{}", self.process.address());
        self.wait_ready().await
    }

    /// Issues an API key with the operator command; returns the token.
    pub async fn create_key(&self, tenant: &str, scopes: &str) -> Result<String> {
        let output = tokio::process::Command::new(workspace_binary("access-gateway"))
            .args([
                "--database-url",
                &self.database.url,
                "create-key",
                "--tenant",
                tenant,
                "--scopes",
                scopes,
            ])
            .output()
            .await
            .map_err(crate::io_error("running access-gateway create-key"))?;
        if !output.status.success() {
            return Err(HarnessError::Setup(format!(
                "create-key failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Revokes an API key with the operator command.
    pub async fn revoke_key(&self, token: &str) -> Result<()> {
        let key_id = token
            .strip_prefix("wk_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(id, _)| id.to_string())
            .ok_or_else(|| HarnessError::Setup("not a key".into()))?;
        let output = tokio::process::Command::new(workspace_binary("access-gateway"))
            .args([
                "--database-url",
                &self.database.url,
                "revoke-key",
                "--key-id",
                &key_id,
            ])
            .output()
            .await
            .map_err(crate::io_error("running access-gateway revoke-key"))?;
        if !output.status.success() {
            return Err(HarnessError::Setup("revoke-key failed".into()));
        }
        Ok(())
    }

    pub fn request(&self, method: Method, path: &str, key: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(request: RequestBuilder) -> Answer {
        let response = request.send().await.expect("the gateway answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("a body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Answer {
        Self::send(self.request(Method::GET, path, key)).await
    }

    /// A POST with a JSON body and an idempotency key.
    pub async fn post(&self, path: &str, key: &str, idempotency_key: &str, body: Value) -> Answer {
        Self::send(
            self.request(Method::POST, path, key)
                .header("Idempotency-Key", idempotency_key)
                .json(&body),
        )
        .await
    }
}
