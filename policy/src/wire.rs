//! The admin API's limits, which the appliance enforces and the CLI sizes
//! its requests by.

/// Largest request body accepted, in bytes (a 10 000-signature batch is about 2.5 MB).
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// Most signatures (or hashes) accepted in one batch request.
pub const MAX_BATCH: usize = 10_000;
/// Default and largest page size of listings.
pub const PAGE_DEFAULT: u32 = 100;
/// Largest page size of listings.
pub const PAGE_MAX: u32 = 1000;
