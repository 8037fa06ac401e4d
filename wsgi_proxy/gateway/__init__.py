"""Gateway policy, free of Flask: the core that forwards each call, and what it decides with:
authentication, tenancy (limits, ownership, usage), model routing, stream leases, and the watch
on client connections."""
