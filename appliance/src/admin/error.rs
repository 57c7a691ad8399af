//! The admin API's error type and the extractors that turn malformed input
//! into it, so that bad input always gets a 4xx with a JSON body naming the
//! offending field, never a panic or a 500.
//!
//! Body: `{"error": {"code": "...", "message": "...", "field": "...", "details": [...]}}`
//! (`field` and `details` only when known).

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::store::StoreError;

/// An error answered to an admin client (boxed, so `Result`s stay small;
/// the fields are reached through `Deref` to [`ErrorBody`]).
#[derive(Debug, Clone)]
pub struct ApiError(Box<ErrorBody>);

/// The content of an [`ApiError`].
#[derive(Debug, Clone)]
pub struct ErrorBody {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `not_found`, `invalid_policy`.
    pub code: &'static str,
    /// One sentence for a human, naming the offending thing.
    pub message: String,
    /// JSON path of the offending request field, when there is one.
    pub field: Option<String>,
    /// Structured details (e.g. policy diagnostics with line and column).
    pub details: Option<serde_json::Value>,
}

impl std::ops::Deref for ApiError {
    type Target = ErrorBody;
    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            status,
            code,
            message: message.into(),
            field: None,
            details: None,
        }))
    }

    /// 400 `invalid` about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message).with_field(field)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 `internal`. The message must not carry secrets.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Names the offending request field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.0.field = Some(field.into());
        self
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.0.details = Some(details);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let b = *self.0;
        let mut e = serde_json::json!({ "code": b.code, "message": b.message });
        if let Some(obj) = e.as_object_mut() {
            if let Some(f) = b.field {
                obj.insert("field".into(), f.into());
            }
            if let Some(d) = b.details {
                obj.insert("details".into(), d);
            }
        }
        (b.status, Json(serde_json::json!({ "error": e }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Invalid { what, .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()).with_field(*what)
            }
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            _ => Self::internal(e.to_string()),
        }
    }
}

/// A JSON request body. Unlike `axum::Json` it reports the JSON path of the
/// offending field, does not insist on a `Content-Type`, and answers every
/// failure with an [`ApiError`]. Request types should use
/// `#[serde(deny_unknown_fields)]`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "request body is larger than the limit of {} bytes",
                        super::MAX_BODY
                    ),
                )
            } else {
                ApiError::new(e.status(), "bad_body", e.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body into `T`, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "request body is empty; expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        if syntax {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("request body is not valid JSON: {inner}"),
            )
        } else if path == "." {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("request body: {inner}"),
            )
        } else {
            ApiError::invalid(path.clone(), format!("request field `{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("request body has trailing data after the JSON value: {e}"),
        )
    })?;
    Ok(value)
}

/// Query-string parameters; a malformed query is a 400 [`ApiError`].
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("query string: {}", e.body_text()),
                )
            })
    }
}

/// Path parameters; a malformed one (e.g. a non-numeric id) is a 400 [`ApiError`].
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("URL path: {}", e.body_text()),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        sha256: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
    }

    #[test]
    fn names_the_field_path() {
        let e = parse_json::<Outer>(br#"{"items":[{"sha256":"a"},{"sha256":1}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.field.as_deref(), Some("items[1].sha256"));
        let e = parse_json::<Outer>(br#"{"items":[],"bogus":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `bogus`"), "{}", e.message);
        let e = parse_json::<Outer>(br#"{"items":["#).unwrap_err();
        assert_eq!(e.code, "bad_json");
        let e = parse_json::<Outer>(b"  ").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_json::<Outer>(br#"{"items":[]} x"#).unwrap_err();
        assert!(e.message.contains("trailing"), "{}", e.message);
    }
}
