"""Authentication and access control: who a request comes from and what it may do."""
