-- The MLflow server's own PostgreSQL role and its two databases (cluster/README.md, Path A step 3 and
-- Path B). Run ONCE, by you, as the instance's master user, from a machine that may reach the
-- database (the launcher instance); the master password never goes to the cluster:
--
--   psql "host=$PG_HOST dbname=postgres user=pgmaster sslmode=require" \
--        -v role=mlflow_server -v pw="$MLFLOW_DB_PW" -v ON_ERROR_STOP=1 -f cluster/mlflow-db-role.sql
--
-- What the role may do: log in, and own the `mlflow` (runs, params, metrics) and `mlflow_auth`
-- (MLflow's users and permissions) databases, so that the server can create and migrate its tables
-- there. Nothing else: no superuser, no CREATEDB, no CREATEROLE, no membership in rds_superuser,
-- and no other role may connect to those two databases (CONNECT revoked from PUBLIC). Its URI is
-- what mlflow-server.env / the conmim-mlflow-server Secret hold; cluster/mlflow-server.sh refuses
-- a URI that logs in as a master user.
CREATE ROLE :"role" LOGIN PASSWORD :'pw' NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    CONNECTION LIMIT 32;
-- CREATE DATABASE ... OWNER needs the creator to be able to act as the new owner (PostgreSQL >= 16
-- gives the creator of a role ADMIN on it, not membership); the grant is taken back below.
GRANT :"role" TO CURRENT_USER;
CREATE DATABASE mlflow OWNER :"role";
CREATE DATABASE mlflow_auth OWNER :"role";
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE :"role" FROM CURRENT_USER;
