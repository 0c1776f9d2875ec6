#!/usr/bin/env bash
# Installs a fieldgate .deb built for THIS machine's architecture and checks the whole package
# life cycle as root: install (user, groups, enabled unit, permissions), `systemd-analyze
# verify` of the installed unit, upgrade keeping an edited config, remove keeping the config
# and queue, purge removing both. CI runs it on a throw-away machine; it changes the system.
#
#   cross/deb-check.sh target/deb/fieldgate_<v>_amd64.deb
set -euo pipefail
deb="${1:?usage: cross/deb-check.sh PACKAGE.deb}"
fail() { echo "deb-check: FAIL: $*" >&2; exit 1; }
ok() { echo "deb-check: ok: $*"; }
export DEBIAN_FRONTEND=noninteractive

dpkg -i "$deb" >/dev/null
ok "installed $(dpkg-query -W -f='${Package} ${Version} ${Architecture}' fieldgate)"
/usr/bin/fieldgate --version
id fieldgate | grep -q '(dialout)' || fail "user fieldgate is not in group dialout: $(id fieldgate)"
ok "system user: $(id fieldgate)"
[ "$(getent passwd fieldgate | cut -d: -f7)" = /usr/sbin/nologin ] || fail "fieldgate has a login shell"
[ -L /etc/systemd/system/multi-user.target.wants/fieldgate.service ] || fail "service not enabled"
ok "service enabled: $(readlink /etc/systemd/system/multi-user.target.wants/fieldgate.service)"
[ "$(stat -c '%U:%G %a' /etc/fieldgate)" = "root:fieldgate 750" ] || fail "/etc/fieldgate is $(stat -c '%U:%G %a' /etc/fieldgate)"
runuser -u fieldgate -- /usr/bin/fieldgate check-config -c /etc/fieldgate/fieldgate.toml >/dev/null \
  || fail "the service user cannot read or validate /etc/fieldgate/fieldgate.toml"
ok "the service user validates the installed config"

if command -v systemd-analyze >/dev/null; then
  # verify warns on stderr for problems it does not count as errors: both must be clean.
  out=$(systemd-analyze verify /lib/systemd/system/fieldgate.service 2>&1) || fail "systemd-analyze verify: $out"
  [ -z "$(echo "$out" | grep -i fieldgate.service)" ] || fail "systemd-analyze verify warns: $out"
  ok "systemd-analyze verify: clean ($(systemd-analyze --version | head -1))"
  echo "deb-check: exposure (lower is safer): $(systemd-analyze security --offline=true /lib/systemd/system/fieldgate.service 2>/dev/null | tail -1 || echo n/a)"
else
  echo "deb-check: systemd-analyze not available on this machine; unit not verified"
fi

# Upgrade (reinstall) keeps an administrator's edits to the conffile.
echo '# edited by deb-check' >> /etc/fieldgate/fieldgate.toml
dpkg -i --force-confold "$deb" >/dev/null
grep -q '^# edited by deb-check' /etc/fieldgate/fieldgate.toml || fail "upgrade replaced the edited config"
ok "upgrade kept the edited /etc/fieldgate/fieldgate.toml"

# A queue left by the service survives remove, and purge deletes it with the config.
install -d -o fieldgate -g fieldgate /var/lib/fieldgate/queue
dpkg -r fieldgate >/dev/null
[ ! -e /usr/bin/fieldgate ] || fail "remove left /usr/bin/fieldgate"
[ -f /etc/fieldgate/fieldgate.toml ] || fail "remove deleted the config"
[ -d /var/lib/fieldgate/queue ] || fail "remove deleted the queue"
ok "remove: binary gone, config and queue kept"
dpkg -P fieldgate >/dev/null
[ ! -e /etc/fieldgate/fieldgate.toml ] || fail "purge left the config"
[ ! -e /var/lib/fieldgate ] || fail "purge left /var/lib/fieldgate"
[ ! -e /etc/systemd/system/multi-user.target.wants/fieldgate.service ] || fail "purge left the enable link"
ok "purge: config, queue and enable link gone"
