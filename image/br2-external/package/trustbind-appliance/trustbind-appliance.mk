################################################################################
#
# trustbind-appliance
#
################################################################################

# The workspace this BR2_EXTERNAL tree lives in (image/br2-external/../..).
TRUSTBIND_APPLIANCE_VERSION = local
TRUSTBIND_APPLIANCE_SITE = $(BR2_EXTERNAL_TRUSTBIND_PATH)/../..
TRUSTBIND_APPLIANCE_SITE_METHOD = local
TRUSTBIND_APPLIANCE_LICENSE = Proprietary
# cargo builds the workspace member from the workspace root (Cargo.lock).
TRUSTBIND_APPLIANCE_SUBDIR = appliance
TRUSTBIND_APPLIANCE_CARGO_BUILD_OPTS = --locked

# A `local` package is rsync'ed, not downloaded, so buildroot's download
# step does not vendor its crates; vendor them after the rsync (this needs
# the internet once, like any download).
define TRUSTBIND_APPLIANCE_CARGO_VENDOR
	cd $(@D) && mkdir -p .cargo && \
		$(PKG_CARGO_ENV) $(HOST_DIR)/bin/cargo vendor --locked VENDOR \
		> .cargo/config.toml
endef
TRUSTBIND_APPLIANCE_POST_RSYNC_HOOKS += TRUSTBIND_APPLIANCE_CARGO_VENDOR

$(eval $(cargo-package))
