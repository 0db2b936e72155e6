//! `GET /v1/models`: the names and aliases the caller may ask for, in OpenAI's list format.

use crate::auth::Principal;
use crate::route::Router;
use bytes::Bytes;

pub fn list(router: &Router, principal: &Principal) -> Bytes {
    let data: Vec<serde_json::Value> = router
        .names_for(principal)
        .map(|name| serde_json::json!({ "id": name, "object": "model", "created": 0, "owned_by": "tollgate" }))
        .collect();
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({ "object": "list", "data": data }))
            .unwrap_or_default(),
    )
}
