"""Role rebalancing: the leader election (`leader.py`), the rebalancer loop
(`rebalancer.py`), desired roles in etcd (`role_store.py`), the governor and the
policies (one file each, created by name through ``factory.create_rebalance_policy``)."""
