//! Explanations: how the policy decides (or decided) a request
//! ([`crate::policy::engine::Engine::explain`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    check_text, hosts::check_host_name, sha256_arg, AdminState, ApiError, ApiJson, ApiPath,
};
use crate::policy::engine::Engine;
use crate::policy::PolicyError;
use crate::request::{Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target};

fn engine(st: &AdminState) -> Result<Arc<Engine>, ApiError> {
    st.engine.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this appliance serves no policy engine to explain with",
        )
    })
}

fn policy_error(e: PolicyError) -> ApiError {
    match e {
        PolicyError::UnknownHost(h) => {
            ApiError::not_found(format!("host `{h}` is not registered with the appliance"))
                .with_field("host")
        }
        PolicyError::Request(m) => ApiError::invalid("action", m),
        e => ApiError::internal(e.to_string()),
    }
}

/// Body of `POST /v1/explain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainIn {
    host: String,
    user: String,
    /// SHA-256 of the program.
    program: String,
    action: String,
    /// File path (file actions), `ADDR:PORT` (connect, accept) or socket
    /// path (ipc_connect); none for exec.
    #[serde(default)]
    resource: Option<String>,
    /// The program's path, for the record only.
    #[serde(default)]
    path: Option<String>,
    /// ipc_connect: SHA-256 of the listening program.
    #[serde(default)]
    peer: Option<String>,
}

fn program(sha256: String, path: String) -> Program {
    Program {
        sha256,
        sha1: String::new(),
        size: 0,
        path,
    }
}

/// The request `body` describes, at `at_ms`, with no session or ancestry.
fn request(body: ExplainIn, at_ms: i64) -> Result<QualifyRequest, ApiError> {
    check_host_name("host", &body.host)?;
    check_text("user", &body.user)?;
    if body.user.is_empty() {
        return Err(ApiError::invalid("user", "`user` must not be empty"));
    }
    let sha = sha256_arg("program", &body.program)?;
    let action = Action::parse(&body.action).ok_or_else(|| {
        let all: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        ApiError::invalid(
            "action",
            format!(
                "unknown action `{}`; one of {}",
                body.action,
                all.join(", ")
            ),
        )
    })?;
    if let Some(r) = &body.resource {
        check_text("resource", r)?;
    }
    let need = |what: &str| {
        body.resource
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(
                    "resource",
                    format!("action `{}` needs a resource: {what}", action.as_str()),
                )
            })
    };
    let net = |proto: Proto, addr: String, port: u16| {
        Target::Net(FiveTuple {
            proto,
            src_addr: String::new(),
            src_port: 0,
            dst_addr: addr,
            dst_port: port,
            established: false,
        })
    };
    let target = match action {
        Action::Exec => {
            if body.resource.is_some() {
                return Err(ApiError::invalid(
                    "resource",
                    "action `exec` takes no resource: the program is the resource",
                ));
            }
            Target::Exec {
                loader_direct: false,
            }
        }
        Action::OpenRead | Action::OpenWrite | Action::Delete | Action::Rename => {
            Target::file(need("a file path")?, None)
        }
        Action::Connect | Action::Accept => {
            let r = need("ADDR:PORT")?;
            let bad = || {
                ApiError::invalid(
                    "resource",
                    format!("`{r}` is not ADDR:PORT (e.g. 10.0.0.2:443 or [::1]:443)"),
                )
            };
            let (addr, port) = r.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            if addr.is_empty() {
                return Err(bad());
            }
            net(Proto::Tcp, addr.to_owned(), port)
        }
        Action::IpcConnect => net(Proto::Unix, need("a socket path or @name")?, 0),
    };
    let peer = match (action, body.peer) {
        (Action::IpcConnect, Some(p)) => Some(program(sha256_arg("peer", &p)?, String::new())),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "peer",
                "`peer` (the listening program) is for action `ipc_connect` only",
            ))
        }
        (_, None) => None,
    };
    Ok(QualifyRequest {
        host: body.host,
        action,
        subject: Subject {
            user: body.user,
            uid: u32::MAX,
            euid: u32::MAX,
            gid: u32::MAX,
            loginuid: u32::MAX,
            session: u32::MAX,
            pid: 0,
            ancestry: Vec::new(),
        },
        program: program(sha, body.path.unwrap_or_default()),
        target,
        at_ms,
        peer,
    })
}

/// `POST /v1/explain`: how the current policy decides a request.
pub(super) async fn ask(
    State(st): State<AdminState>,
    ApiJson(body): ApiJson<ExplainIn>,
) -> Result<Json<Value>, ApiError> {
    let e = engine(&st)?;
    let req = request(body, crate::agent_api::service::now_ms())?;
    tokio::task::spawn_blocking(move || {
        let x = e.explain(&req).map_err(policy_error)?;
        Ok(Json(json!({ "request": req, "now": x })))
    })
    .await
    .map_err(|e| ApiError::internal(format!("explain task failed: {e}")))?
}

/// `GET /v1/explain/{seq}`: a recorded decision, as recorded, and how the
/// current policy decides its request.
pub(super) async fn recorded(
    State(st): State<AdminState>,
    ApiPath(seq): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let e = engine(&st)?;
    if seq < 1 {
        return Err(ApiError::invalid(
            "seq",
            format!("audit sequence {seq} is below 1"),
        ));
    }
    let row = st
        .run(move |s| {
            s.audit_rows(seq - 1, 1)?
                .into_iter()
                .next()
                .filter(|r| r.seq == seq)
                .ok_or_else(|| ApiError::not_found(format!("no audit row {seq}")).with_field("seq"))
        })
        .await?;
    if row.kind != "decision" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "audit row {seq} is a `{}` row; only `decision` rows are explained (ask with host, user, program and action instead)",
                row.kind
            ),
        )
        .with_field("seq"));
    }
    let detail: Value = serde_json::from_str(&row.detail)
        .map_err(|e| ApiError::internal(format!("audit row {seq}: detail is not JSON: {e}")))?;
    let req: QualifyRequest = serde_json::from_value(
        detail.get("request").cloned().unwrap_or(Value::Null),
    )
    .map_err(|e| ApiError::internal(format!("audit row {seq}: request does not read back: {e}")))?;
    let outcome = detail.get("outcome").cloned().unwrap_or(Value::Null);
    let recorded = json!({
        "generation": detail.get("generation"),
        "verdict": outcome.get("verdict"),
        "would_deny": outcome.get("would_deny"),
        "reasons": outcome.get("reasons"),
        "alerts": outcome.get("alerts").cloned().unwrap_or_else(|| json!([])),
        "explain": outcome.get("explain"),
    });
    let r = req.clone();
    let now = tokio::task::spawn_blocking(move || e.explain(&r))
        .await
        .map_err(|e| ApiError::internal(format!("explain task failed: {e}")))?;
    let (now, now_error) = match now {
        Ok(x) => (serde_json::to_value(x).unwrap_or(Value::Null), Value::Null),
        Err(e) => (Value::Null, Value::String(e.to_string())),
    };
    Ok(Json(json!({
        "seq": row.seq,
        "at_ms": row.at_ms,
        "request": req,
        "recorded": recorded,
        "now": now,
        "now_error": now_error,
    })))
}
