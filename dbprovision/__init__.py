"""Addons: shared and dedicated PostgreSQL and Redis for tenants (docs/architecture.md,
"Databases"). `service.Provisioner` is the facade the controller and the jobs call."""
