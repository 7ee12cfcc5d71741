#!/bin/sh
# The image's entry point, with registry:2's conventions:
#   IMAGE                        serve /etc/docker/registry/config.yml (the image's, or one mounted over it)
#   IMAGE /path/config.yml       serve that file
#   IMAGE serve CONFIG, IMAGE garbage-collect CONFIG, IMAGE gc ..., any other wharf command
#   IMAGE sh                     run anything else
# Without a file at the default path it serves registry:2's defaults: every interface on port 5000,
# storage in /var/lib/registry. REGISTRY_* variables override keys in every case.
# WHARF_IMAGE_CONFIG and WHARF_IMAGE_ROOT move those two paths (the tests run this script outside a container).
set -e
default_config="${WHARF_IMAGE_CONFIG:-/etc/docker/registry/config.yml}"
case "$1" in
  *.yaml|*.yml)
    if [ "$1" = "$default_config" ] && [ ! -e "$1" ]; then
      # No file where the image keeps one: registry:2's defaults, under the REGISTRY_* variables.
      export REGISTRY_HTTP_ADDR="${REGISTRY_HTTP_ADDR:-:5000}"
      if [ -z "$REGISTRY_STORAGE" ]; then
        export REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY="${REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY:-${WHARF_IMAGE_ROOT:-/var/lib/registry}}"
      fi
      shift
    fi
    set -- wharf serve "$@"
    ;;
  serve|garbage-collect|gc|rm|retention|quota|immutability|backup|restore|import|htpasswd|cert|help|-*)
    set -- wharf "$@"
    ;;
esac
exec "$@"
