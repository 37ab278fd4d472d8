//! The HTTP face of the server: the table of routes (`spec`), how a request is admitted and
//! answered (`context`, `routes`), each route's work (`handlers`) between the typed bodies of
//! `api`, errors as answers (`error`), the OpenAPI document, the connection listener and the
//! web page. Each file imports only the ones below it, and the `service` beneath them all.

pub mod api;
pub mod context;
pub mod error;
pub mod handlers;
pub mod listener;
pub mod openapi;
pub mod routes;
pub mod spec;
