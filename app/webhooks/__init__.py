"""Customer webhooks: endpoints integrators register, and signed, retried deliveries."""
