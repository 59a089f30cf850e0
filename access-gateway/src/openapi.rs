//! The OpenAPI 3.1 document, generated from the handlers and types, and an interactive page
//! (Swagger UI, served from assets compiled into the binary, so it works offline).

use std::sync::Arc;

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::AppState;
use crate::api::{activities, cluster, health, hierarchy, holds, transactions, transfers, wallets};

#[derive(OpenApi)]
#[openapi(
    info(title = "Wallet platform API", version = "1.0.0",
        description = "Wallets, deposits, withdrawals, payments and holds. Amounts are decimal strings in \
            the currency's unit. Every POST takes an `Idempotency-Key`. Errors are RFC 7807 \
            problem documents."),
    paths(
        wallets::create, wallets::get, wallets::balance, wallets::freeze, wallets::unfreeze,
        wallets::close, activities::list, activities::versions, activities::by_owner, transfers::deposit, transfers::withdraw, transfers::pay,
        holds::place, holds::get, holds::capture, holds::void, hierarchy::me, hierarchy::tree,
        hierarchy::create, hierarchy::rename, hierarchy::move_node, hierarchy::delete,
        hierarchy::attach, hierarchy::detach, transactions::get, transactions::in_flight,
        transactions::retry, transactions::abort, cluster::status,
        transactions::events, health::healthz, health::readyz,
    ),
    modifiers(&BearerKey),
)]
pub struct ApiDoc;

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: `wk_<key id>_<secret>`"))
                    .build(),
            ),
        );
    }
}

/// `/openapi.json` and the interactive page at `/docs`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
