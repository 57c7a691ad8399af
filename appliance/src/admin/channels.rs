//! Channel endpoints: the channels the gate keyed, with each end's close.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{page_limit, AdminState, ApiError, ApiQuery};

/// Query of `GET /v1/channels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only channels no end reported closed.
    open: Option<bool>,
    /// Ids above this one (paging: the previous page's `next`).
    after: Option<i64>,
    limit: Option<u32>,
}

pub(super) async fn list(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or(0);
    let open = q.open.unwrap_or(false);
    st.run(move |s| {
        let channels = s.list_channels(open, after, limit)?;
        let full = u32::try_from(channels.len()).unwrap_or(u32::MAX) == limit;
        let next = channels.last().filter(|_| full).map(|c| c.id);
        Ok(Json(json!({ "channels": channels, "next": next })))
    })
    .await
}
