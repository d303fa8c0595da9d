"""A loopback fake of the Hetzner Cloud API, enough for the runner and the `hcloud` client.

It speaks the wire format `hcloud` 2.27 reads (`/v1/servers`, `/v1/actions/<id>`, plus the
server type, location and image listings), keeps everything in memory behind one lock, and
behaves like the real API where the runner depends on it:

- errors are `{"error": {"code", "message", "details"}}` with Hetzner's HTTP statuses:
  `invalid_input` 400, `unauthorized` 401, `resource_limit_exceeded` and `resource_unavailable`
  403, `not_found` 404, `uniqueness_error` 409, `locked` 423, `rate_limit_exceeded` 429;
- server names are unique per project: a second create answers 409 `uniqueness_error`;
- server types are sold per location (`server_types[].locations`, each with its own
  `deprecation`): a create in a location the type is not sold in (or no longer sold in) answers
  400 `invalid_input`, as does an SSH key name the project does not have;
- the project has a server limit (`server_limit`): a create beyond it answers 403
  `resource_limit_exceeded`;
- `label_selector` filters lists (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`);
- actions run for `action_seconds` (0: they finish at once), the server is `initializing`
  until its create action finishes and `running` afterwards; while an action on a server runs,
  deleting it answers 423 `locked`;
- every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`; the
  budget (`rate_limit` requests, one more each `rate_refill_seconds`) spent, 429
  `rate_limit_exceeded`;
- every request needs `Authorization: Bearer <token>` (any token, or exactly `token=` if given);
- with `state_file`, servers, actions and the address counter are kept in that JSON file, so a
  restart forgets nothing; an IPv4 address is never handed out twice.

Use it in-process as a context manager::

    with FakeHetzner() as fake:
        client = hcloud.Client(token="t", api_endpoint=fake.url)
        ...
        assert [s["name"] for s in fake.servers] == ["agent-..."]

or as a process: ``python -m provisioning.localdev.fake_hetzner --port 8701``.

The package: `catalogue` (locations, server types, images), `errors` (the error body),
`labels` (label selectors), `state` (servers, actions, the state file), `validation` (a
create's field checks), `render` (the JSON of servers and pages), `api` (`FakeHetzner` and its
route table), `handler` (HTTP), `cli` (the process).
"""

from provisioning.localdev.fake_hetzner.api import FakeHetzner
from provisioning.localdev.fake_hetzner.catalogue import IMAGES, LOCATIONS, SERVER_TYPES
from provisioning.localdev.fake_hetzner.cli import main
from provisioning.localdev.fake_hetzner.errors import ApiError
from provisioning.localdev.fake_hetzner.labels import labels_match

__all__ = [
    "IMAGES",
    "LOCATIONS",
    "SERVER_TYPES",
    "ApiError",
    "FakeHetzner",
    "labels_match",
    "main",
]
