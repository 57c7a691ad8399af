// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers of trustbind.ko: the kernel structs, macros and static inlines
 * behind the flat functions declared in helpers.h.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <crypto/hash.h>
#include <crypto/sha2.h>
#include <crypto/ecdh.h>
#include <crypto/internal/ecc.h>
#include <crypto/algapi.h>
#include <crypto/aead.h>
#include <crypto/gcm.h>
#include <linux/scatterlist.h>
#include <linux/audit.h>
#include <linux/binfmts.h>
#include <linux/debugfs.h>
#include <linux/cred.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/stat.h>
#include <linux/magic.h>
#include <linux/mnt_idmapping.h>
#include <linux/wait.h>
#include <linux/jiffies.h>
#include <linux/file.h>
#include <linux/rcupdate.h>
#include <linux/sched/mm.h>
#include <linux/signal.h>
#include <linux/tracepoint.h>
#include <linux/ratelimit.h>
#include <linux/moduleparam.h>
#include <linux/namei.h>
#include <linux/fs_struct.h>
#include <linux/pid_namespace.h>
#include <linux/sched/task.h>
#include <linux/mutex.h>
#include <linux/dcache.h>
#include <linux/elf.h>
#include <linux/ftrace.h>
#include <linux/kallsyms.h>
#include <linux/net.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <net/inet_common.h>
#include <net/ipv6.h>
#include <net/tcp.h>
#include <net/rps.h>
#include <net/mptcp.h>
#include <net/tls.h>
#include <linux/tls.h>
#include <linux/string.h>
#include <linux/pid.h>
#include <linux/un.h>
#include <net/af_unix.h>
#include <linux/workqueue.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <net/net_namespace.h>

#include <linux/task_work.h>
#include <linux/compat.h>
#include <linux/kdev_t.h>
#include <asm/syscall.h>
#include <asm/unistd.h>
#include "helpers.h"

/* --- Hashing ------------------------------------------------------------ */

struct tb_hashers {
	struct crypto_shash *sha256;
	struct crypto_shash *sha1;
};

/*
 * A wait that only a fatal signal may end, on top of the interruptible
 * waits of Rust's CondVar (6.12 has no killable one): every other signal
 * is blocked for its length, so it stays pending and is delivered once
 * the mask is restored. SIGKILL and SIGSTOP cannot be blocked.
 */
u64 tb_signals_block(void)
{
	sigset_t all, old;

	BUILD_BUG_ON(sizeof(sigset_t) != sizeof(u64));
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &old);
	return old.sig[0];
}

void tb_signals_restore(u64 old)
{
	sigset_t set = { .sig = { old } };

	sigprocmask(SIG_SETMASK, &set, NULL);
}

int tb_hashers_alloc(struct tb_hashers **out)
{
	struct tb_hashers *h;
	int err;

	h = kzalloc(sizeof(*h), GFP_KERNEL);
	if (!h)
		return -ENOMEM;
	h->sha256 = crypto_alloc_shash("sha256", 0, 0);
	if (IS_ERR(h->sha256)) {
		err = PTR_ERR(h->sha256);
		pr_err("cannot allocate sha256 transform: %d\n", err);
		goto free_h;
	}
	h->sha1 = crypto_alloc_shash("sha1", 0, 0);
	if (IS_ERR(h->sha1)) {
		err = PTR_ERR(h->sha1);
		pr_err("cannot allocate sha1 transform: %d\n", err);
		goto free_sha256;
	}
	*out = h;
	return 0;

free_sha256:
	crypto_free_shash(h->sha256);
free_h:
	kfree(h);
	return err;
}

void tb_hashers_free(struct tb_hashers *h)
{
	if (!h)
		return;
	crypto_free_shash(h->sha1);
	crypto_free_shash(h->sha256);
	kfree(h);
}

const char *tb_hashers_driver(const struct tb_hashers *h, int which)
{
	return crypto_shash_driver_name(which ? h->sha1 : h->sha256);
}

/* Both digests advance together: one pass over the data feeds both. */
static int tb_both_init(struct shash_desc *d256, struct shash_desc *d1)
{
	int err = crypto_shash_init(d256);

	return err ? err : crypto_shash_init(d1);
}

static int tb_both_update(struct shash_desc *d256, struct shash_desc *d1,
			  const u8 *data, size_t len)
{
	int err = crypto_shash_update(d256, data, len);

	return err ? err : crypto_shash_update(d1, data, len);
}

static int tb_both_final(struct shash_desc *d256, struct shash_desc *d1,
			 u8 *sha256_out, u8 *sha1_out)
{
	int err = crypto_shash_final(d256, sha256_out);

	if (!err)
		err = crypto_shash_final(d1, sha1_out);
	shash_desc_zero(d256);
	shash_desc_zero(d1);
	return err;
}

int tb_hashers_digest(struct tb_hashers *h, const u8 *data, size_t len,
		      u8 *sha256_out, u8 *sha1_out)
{
	SHASH_DESC_ON_STACK(d256, h->sha256);
	SHASH_DESC_ON_STACK(d1, h->sha1);
	int err;

	d256->tfm = h->sha256;
	d1->tfm = h->sha1;
	err = tb_both_init(d256, d1);
	if (!err)
		err = tb_both_update(d256, d1, data, len);
	if (!err)
		return tb_both_final(d256, d1, sha256_out, sha1_out);
	shash_desc_zero(d256);
	shash_desc_zero(d1);
	return err;
}

/* --- Exec interception -------------------------------------------------- */

static int tb_load_binary(struct linux_binprm *bprm)
{
	int ret = trustbind_exec_check(bprm);

	/* -ENOEXEC hands the exec on to the next handler (ELF, script, ...). */
	return ret ? ret : -ENOEXEC;
}

static struct linux_binfmt tb_binfmt = {
	.module = THIS_MODULE,
	.load_binary = tb_load_binary,
};

void tb_exec_register(void)
{
	__register_binfmt(&tb_binfmt, 1);
}

void tb_exec_unregister(void)
{
	unregister_binfmt(&tb_binfmt);
}

const char *tb_bprm_path(const struct linux_binprm *bprm)
{
	return bprm->interp;
}

/*
 * The current task's context into *out (a struct tb_exec_info or
 * tb_net_info: the same field names), ids in the init user namespace.
 */
#define TB_FILL_TASK(out)							\
	do {									\
		const struct cred *__cred = current_cred();			\
		struct task_struct *__parent;					\
										\
		(out)->uid = from_kuid(&init_user_ns, __cred->uid);		\
		(out)->euid = from_kuid(&init_user_ns, __cred->euid);		\
		(out)->gid = from_kgid(&init_user_ns, __cred->gid);		\
		(out)->loginuid = from_kuid(&init_user_ns,			\
					    audit_get_loginuid(current));	\
		(out)->sessionid = audit_get_sessionid(current);		\
		(out)->tgid = task_tgid_nr(current);				\
		(out)->start_ns = current->group_leader->start_boottime;	\
		rcu_read_lock();						\
		__parent = rcu_dereference(current->real_parent);		\
		(out)->ptgid = task_tgid_nr(__parent);				\
		(out)->pstart_ns = __parent->group_leader->start_boottime;	\
		rcu_read_unlock();						\
	} while (0)

static int tb_fill_info(const struct path *path, struct tb_exec_info *out)
{
	struct inode *inode = d_inode(path->dentry);
	struct kstat stat;
	int err;

	memset(out, 0, sizeof(*out));
	err = vfs_getattr_nosec(path, &stat, STATX_CHANGE_COOKIE,
				AT_STATX_SYNC_AS_STAT);
	if (err)
		return err;
	out->size = i_size_read(inode);
	out->dev = inode->i_sb->s_dev;
	out->ino = inode->i_ino;
	out->generation = inode->i_generation;
	out->fs_magic = (u32)inode->i_sb->s_magic;
	if (stat.result_mask & STATX_CHANGE_COOKIE) {
		out->has_change_cookie = 1;
		out->change_cookie = stat.change_cookie;
	}
	TB_FILL_TASK(out);
	out->pid = task_pid_nr(current);
	return 0;
}

int tb_bprm_info(const struct linux_binprm *bprm, struct tb_exec_info *out)
{
	return tb_fill_info(&bprm->file->f_path, out);
}

/*
 * What a set-uid bit on this round's file would do (bprm_fill_uid(),
 * which runs only once the exec is committed): the file's mode and
 * owner (init user namespace), and whether the kernel would honour the
 * bit: the mount allows it (not nosuid, its super block's user namespace
 * ours; mnt_may_suid() is not exported, its mount-namespace check is
 * left out), no no_new_privs, the owner mapped.
 */
void tb_bprm_setid(const struct linux_binprm *bprm, u32 *mode, u32 *owner,
		   bool *honoured)
{
	struct file *file = bprm->execfd_creds ? bprm->executable : bprm->file;
	struct inode *inode = file_inode(file);
	vfsuid_t vfsuid = i_uid_into_vfsuid(file_mnt_idmap(file), inode);

	*mode = READ_ONCE(inode->i_mode);
	*owner = from_kuid(&init_user_ns, vfsuid_into_kuid(vfsuid));
	*honoured = !(file->f_path.mnt->mnt_flags & MNT_NOSUID) &&
		    current_in_userns(inode->i_sb->s_user_ns) &&
		    !task_no_new_privs(current) &&
		    vfsuid_has_mapping(bprm->cred->user_ns, vfsuid);
}

bool tb_bprm_is_interp(const struct linux_binprm *bprm)
{
	/* bprm_change_interp() replaces interp when a handler swaps in an
	 * interpreter; until then it is the very filename pointer. */
	return bprm->interp != bprm->filename;
}

#define TB_HASH_CHUNK (32 * 1024)

const u8 *tb_bprm_head(const struct linux_binprm *bprm, size_t *len)
{
	*len = BINPRM_BUF_SIZE;
	return bprm->buf;
}

ssize_t tb_file_read(struct file *file, u64 off, u8 *buf, size_t len)
{
	loff_t pos = off;

	return kernel_read(file, buf, len, &pos);
}

struct file *tb_bprm_file(const struct linux_binprm *bprm)
{
	return bprm->file;
}

bool tb_bprm_is_native_elf(const struct linux_binprm *bprm)
{
	const struct elfhdr *h = (const struct elfhdr *)bprm->buf;

	return memcmp(h->e_ident, ELFMAG, SELFMAG) == 0 &&
	       h->e_ident[EI_CLASS] == ELF_CLASS && elf_check_arch(h);
}

static int tb_hash_opened(struct tb_hashers *h, struct file *file,
			  u8 *sha256_out, u8 *sha1_out)
{
	SHASH_DESC_ON_STACK(d256, h->sha256);
	SHASH_DESC_ON_STACK(d1, h->sha1);
	loff_t size = i_size_read(file_inode(file));
	loff_t pos = 0;
	void *buf;
	int err;

	buf = kvmalloc(TB_HASH_CHUNK, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	d256->tfm = h->sha256;
	d1->tfm = h->sha1;
	err = tb_both_init(d256, d1);
	while (!err && pos < size) {
		size_t want = min_t(loff_t, TB_HASH_CHUNK, size - pos);
		ssize_t got = kernel_read(file, buf, want, &pos);

		if (got < 0) {
			err = got;
			break;
		}
		if (got == 0) {
			err = -EIO;	/* shorter than i_size: changed under us */
			break;
		}
		err = tb_both_update(d256, d1, buf, got);
		if (!err && fatal_signal_pending(current))
			err = -EINTR;
	}
	if (!err) {
		err = tb_both_final(d256, d1, sha256_out, sha1_out);
	} else {
		shash_desc_zero(d256);
		shash_desc_zero(d1);
	}
	kvfree(buf);
	return err;
}

/* A reference on the current task's executable (mm->exe_file), or NULL. */
static struct file *tb_current_exe(void)
{
	struct mm_struct *mm = current->mm;
	struct file *f;

	if (!mm)
		return NULL;
	rcu_read_lock();
	f = get_file_rcu(&mm->exe_file);
	rcu_read_unlock();
	return f;
}

int tb_hash_current_exe(struct tb_hashers *h, u8 *sha256_out, u8 *sha1_out,
			u64 *size_out)
{
	struct file *f = tb_current_exe();
	int err;

	if (!f)
		return -ENOENT;
	*size_out = i_size_read(file_inode(f));
	err = tb_hash_opened(h, f, sha256_out, sha1_out);
	fput(f);
	return err;
}

int tb_hash_file(struct tb_hashers *h, const struct linux_binprm *bprm,
		 u8 *sha256_out, u8 *sha1_out)
{
	return tb_hash_opened(h, bprm->file, sha256_out, sha1_out);
}

int tb_hash_task_exe(struct tb_hashers *h, u32 tgid, u64 start_ns,
		     u8 *sha256_out, u8 *sha1_out)
{
	struct task_struct *t = NULL;
	struct mm_struct *mm;
	struct file *f = NULL;
	struct pid *pid;
	int err;

	rcu_read_lock();
	pid = find_pid_ns(tgid, &init_pid_ns);
	if (pid)
		t = pid_task(pid, PIDTYPE_TGID);
	if (t && t->start_boottime == start_ns)
		get_task_struct(t);
	else
		t = NULL;
	rcu_read_unlock();
	if (!t)
		return -ESRCH;
	mm = get_task_mm(t);
	put_task_struct(t);
	if (!mm)
		return -ESRCH;
	rcu_read_lock();
	f = get_file_rcu(&mm->exe_file);
	rcu_read_unlock();
	mmput(mm);
	if (!f)
		return -ENOENT;
	err = tb_hash_opened(h, f, sha256_out, sha1_out);
	fput(f);
	return err;
}

/* --- Statistics in debugfs --------------------------------------------- */

struct dentry *tb_debugfs_dir(void)
{
	struct dentry *d = debugfs_create_dir(KBUILD_MODNAME, NULL);

	return IS_ERR(d) ? NULL : d;
}

void tb_debugfs_u64(struct dentry *dir, const char *name, u64 *value)
{
	if (dir)
		debugfs_create_u64(name, 0400, dir, value);
}

void tb_debugfs_remove(struct dentry *dir)
{
	debugfs_remove(dir);
}

/* --- RCU read sections for Rust (sys/mod.rs RcuCell) -------------------- */

void tb_rcu_read_lock(void)
{
	rcu_read_lock();
}

void tb_rcu_read_unlock(void)
{
	rcu_read_unlock();
}

/* --- Module pinning ----------------------------------------------------- */

bool tb_module_pin(void)
{
	return try_module_get(THIS_MODULE);
}

void tb_module_unpin(void)
{
	module_put(THIS_MODULE);
}

/* --- /dev/trustbind ----------------------------------------------------- */

static DECLARE_WAIT_QUEUE_HEAD(tb_readq);

static int tb_open(struct inode *inode, struct file *file)
{
	return trustbind_dev_open(task_tgid_nr(current));
}

static int tb_release(struct inode *inode, struct file *file)
{
	trustbind_dev_release();
	return 0;
}

static ssize_t tb_read(struct file *file, char __user *buf, size_t len,
		       loff_t *off)
{
	for (;;) {
		ssize_t r = trustbind_dev_read((unsigned long)buf, len);

		if (r != -EAGAIN || (file->f_flags & O_NONBLOCK))
			return r;
		if (wait_event_interruptible(tb_readq, trustbind_dev_readable()))
			return -ERESTARTSYS;
	}
}

static ssize_t tb_write(struct file *file, const char __user *buf,
			size_t len, loff_t *off)
{
	return trustbind_dev_write((unsigned long)buf, len);
}

static __poll_t tb_poll(struct file *file, poll_table *wait)
{
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(file, &tb_readq, wait);
	if (trustbind_dev_readable())
		mask |= EPOLLIN | EPOLLRDNORM;
	return mask;
}

static const struct file_operations tb_fops = {
	.owner = THIS_MODULE,
	.open = tb_open,
	.release = tb_release,
	.read = tb_read,
	.write = tb_write,
	.poll = tb_poll,
	.llseek = noop_llseek,
};

static struct miscdevice tb_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "trustbind",
	.fops = &tb_fops,
	.mode = 0600,
};

int tb_dev_register(void)
{
	return misc_register(&tb_miscdev);
}

void tb_dev_deregister(void)
{
	misc_deregister(&tb_miscdev);
}

void tb_dev_wake_readers(void)
{
	wake_up_interruptible(&tb_readq);
}

/* --- Process and time ----------------------------------------------------- */

static int tb_path_id(const struct path *path, struct tb_file_id *out)
{
	struct inode *inode = d_inode(path->dentry);
	struct kstat stat;
	int err;

	err = vfs_getattr_nosec(path, &stat, STATX_CHANGE_COOKIE,
				AT_STATX_SYNC_AS_STAT);
	if (!err) {
		out->dev = inode->i_sb->s_dev;
		out->ino = inode->i_ino;
		out->generation = inode->i_generation;
		if (stat.result_mask & STATX_CHANGE_COOKIE) {
			out->has_change_cookie = 1;
			out->change_cookie = stat.change_cookie;
		}
	}
	return err;
}

int tb_current_exe_id(struct tb_file_id *out)
{
	struct file *f = tb_current_exe();
	int err;

	memset(out, 0, sizeof(*out));
	if (!f)
		return -ENOENT;
	err = tb_path_id(&f->f_path, out);
	fput(f);
	return err;
}

/*
 * Load-time settings (modprobe.d `options trustbind mode=enforce
 * agent=/usr/sbin/trustbind-agent`): the mode the module starts in, so
 * that nothing runs unqualified between boot and the agent, and the agent
 * binary that may start while no agent is connected. Read once at load.
 */
static char *tb_mode_param = "disabled";
module_param_named(mode, tb_mode_param, charp, 0400);
MODULE_PARM_DESC(mode, "mode at load: disabled (default), permissive or enforce");
static char *tb_agent_param = "";
module_param_named(agent, tb_agent_param, charp, 0400);
MODULE_PARM_DESC(agent, "absolute path of the agent binary allowed to start while no agent is connected");

const char *tb_param_mode(void)
{
	return tb_mode_param ? tb_mode_param : "";
}

const char *tb_param_agent(void)
{
	return tb_agent_param ? tb_agent_param : "";
}

static char *tb_authority_param = "";
module_param_named(authority, tb_authority_param, charp, 0400);
MODULE_PARM_DESC(authority, "the appliance's authority key (P-256 public key x||y, 128 hex digits): believe only records it sealed");

const char *tb_param_authority(void)
{
	return tb_authority_param ? tb_authority_param : "";
}

/* --- Sealed records: session key agreement and MACs -------------------- */

/*
 * An ephemeral P-256 key pair and the ECDH shared secret with `peer`
 * (x || y, big-endian), through the kernel's ECC library (the same calls
 * the "ecdh-nist-p256" kpp makes). The private key never leaves this
 * function.
 */
int tb_ecdh_p256(const u8 *peer, u8 *pub_out, u8 *secret_out)
{
	u64 priv[4], pub[8], secret[4], peer_digits[8];
	int ret;

	memcpy(peer_digits, peer, sizeof(peer_digits));
	ret = ecc_gen_privkey(ECC_CURVE_NIST_P256, 4, priv);
	if (!ret)
		ret = ecc_make_pub_key(ECC_CURVE_NIST_P256, 4, priv, pub);
	if (!ret)
		ret = crypto_ecdh_shared_secret(ECC_CURVE_NIST_P256, 4, priv,
						peer_digits, secret);
	if (!ret) {
		memcpy(pub_out, pub, sizeof(pub));
		memcpy(secret_out, secret, sizeof(secret));
	}
	memzero_explicit(priv, sizeof(priv));
	memzero_explicit(secret, sizeof(secret));
	return ret;
}

/* An "hmac(sha256)" transform keyed with `key` into *out. 0 or -errno. */
int tb_hmac_new(const u8 *key, unsigned int keylen, struct crypto_shash **out)
{
	struct crypto_shash *tfm = crypto_alloc_shash("hmac(sha256)", 0, 0);
	int ret;

	if (IS_ERR(tfm))
		return PTR_ERR(tfm);
	ret = crypto_shash_setkey(tfm, key, keylen);
	if (ret) {
		crypto_free_shash(tfm);
		return ret;
	}
	*out = tfm;
	return 0;
}

void tb_hmac_free(struct crypto_shash *tfm)
{
	crypto_free_shash(tfm);
}

int tb_hmacv(struct crypto_shash *tfm, const u8 *const *parts,
	     const size_t *lens, unsigned int n, u8 *out)
{
	SHASH_DESC_ON_STACK(desc, tfm);
	unsigned int i;
	int ret;

	desc->tfm = tfm;
	ret = crypto_shash_init(desc);
	for (i = 0; !ret && i < n; i++)
		ret = crypto_shash_update(desc, parts[i], lens[i]);
	if (!ret)
		ret = crypto_shash_final(desc, out);
	shash_desc_zero(desc);
	return ret;
}

/*
 * One "gcm(aes)" transform per call: tickets are opened on a worker, once
 * per accepted connection, never in atomic context. The AEAD reads one
 * scatterlist of aad || ct || tag and decrypts in place, so the three are
 * copied into one kmalloc'd buffer (never the stack: the scatterlist
 * needs linear-mapped memory), which is wiped before it is freed.
 */
int tb_gcm_open(const u8 *key, const u8 *nonce, const u8 *aad,
		unsigned int aad_len, const u8 *ct, unsigned int ct_len,
		const u8 *tag, u8 *out)
{
	DECLARE_CRYPTO_WAIT(wait);
	struct crypto_aead *tfm;
	struct aead_request *req;
	struct scatterlist sg;
	u8 iv[GCM_AES_IV_SIZE];
	size_t len = (size_t)aad_len + ct_len + 16;
	u8 *buf;
	int ret;

	tfm = crypto_alloc_aead("gcm(aes)", 0, 0);
	if (IS_ERR(tfm))
		return PTR_ERR(tfm);
	ret = crypto_aead_setkey(tfm, key, 32);
	if (!ret)
		ret = crypto_aead_setauthsize(tfm, 16);
	if (ret)
		goto free_tfm;
	ret = -ENOMEM;
	buf = kmalloc(len, GFP_KERNEL);
	if (!buf)
		goto free_tfm;
	req = aead_request_alloc(tfm, GFP_KERNEL);
	if (!req)
		goto free_buf;
	memcpy(buf, aad, aad_len);
	memcpy(buf + aad_len, ct, ct_len);
	memcpy(buf + aad_len + ct_len, tag, 16);
	memcpy(iv, nonce, sizeof(iv));
	sg_init_one(&sg, buf, len);
	aead_request_set_callback(req, CRYPTO_TFM_REQ_MAY_BACKLOG |
				  CRYPTO_TFM_REQ_MAY_SLEEP,
				  crypto_req_done, &wait);
	aead_request_set_ad(req, aad_len);
	aead_request_set_crypt(req, &sg, &sg, ct_len + 16, iv);
	ret = crypto_wait_req(crypto_aead_decrypt(req), &wait);
	if (!ret)
		memcpy(out, buf + aad_len, ct_len);
	else
		memzero_explicit(out, ct_len);
	aead_request_free(req);
free_buf:
	kfree_sensitive(buf);
free_tfm:
	crypto_free_aead(tfm);
	return ret;
}

void tb_sha256(const u8 *data, size_t len, u8 *out)
{
	sha256(data, len, out);
}

/* Constant-time comparison: true when the n bytes differ. */
bool tb_memneq(const u8 *a, const u8 *b, size_t n)
{
	return crypto_memneq(a, b, n) != 0;
}

void tb_wipe(u8 *p, size_t n)
{
	memzero_explicit(p, n);
}

/*
 * The mode in force, for user space: /sys/module/trustbind/parameters/
 * current_mode reads `disabled`, `permissive` or `enforce` (the Debian
 * packages' prerm refuses a removal in enforce mode). Read-only: the mode
 * is set by the agent, or by `mode` at load.
 */
static atomic_t tb_mode_now = ATOMIC_INIT(0);

void tb_publish_mode(u8 mode)
{
	atomic_set(&tb_mode_now, mode);
}

static int tb_mode_now_set(const char *val, const struct kernel_param *kp)
{
	return -EPERM;
}

static int tb_mode_now_get(char *buf, const struct kernel_param *kp)
{
	static const char *const names[] = { "disabled", "permissive", "enforce" };
	int m = atomic_read(&tb_mode_now);

	return scnprintf(buf, PAGE_SIZE, "%s\n",
			 m >= 0 && m < ARRAY_SIZE(names) ? names[m] : "unknown");
}

static const struct kernel_param_ops tb_mode_now_ops = {
	.set = tb_mode_now_set,
	.get = tb_mode_now_get,
};
module_param_cb(current_mode, &tb_mode_now_ops, NULL, 0444);
MODULE_PARM_DESC(current_mode, "the mode in force (read-only): disabled, permissive or enforce");

int tb_file_id_of(const char *name, struct tb_file_id *out)
{
	struct path path;
	int err;

	memset(out, 0, sizeof(*out));
	err = kern_path(name, LOOKUP_FOLLOW, &path);
	if (err)
		return err;
	err = d_is_reg(path.dentry) ? tb_path_id(&path, out) : -EINVAL;
	path_put(&path);
	return err;
}

u64 tb_now_ms(void)
{
	return jiffies64_to_msecs(get_jiffies_64());
}

static DEFINE_RATELIMIT_STATE(tb_log_rs, DEFAULT_RATELIMIT_INTERVAL,
			      DEFAULT_RATELIMIT_BURST);

bool tb_log_ratelimit(void)
{
	return __ratelimit(&tb_log_rs);
}

void tb_set_nice_current(int nice)
{
	set_user_nice(current, nice);
}

/* --- Loader gate: see the end of this file (open_exec() wrapper) ------- */

int tb_open_info(const struct file *file, struct tb_exec_info *out)
{
	return tb_fill_info(&file->f_path, out);
}

int tb_hash_open(struct tb_hashers *h, struct file *file, u8 *sha256_out,
		 u8 *sha1_out)
{
	return tb_hash_opened(h, file, sha256_out, sha1_out);
}

int tb_open_name(const struct file *file, char *buf, int len, const char **out)
{
	char *p = d_path(&file->f_path, buf, len);

	if (IS_ERR(p))
		return PTR_ERR(p);
	*out = p;
	return 0;
}


/* --- Connect/accept qualification ------------------------------------------ */

/*
 * How a call reaches a wrapper: ftrace calls tb_net_redirect() at the
 * fentry of inet_stream_connect()/inet_accept()/tcp_close() (and
 * tcp_sendmsg(), fast open only) (preemption disabled, must
 * not sleep); it counts the call in flight and moves the saved instruction
 * pointer to the wrapper, so the trampoline "returns" into the wrapper with
 * the original arguments and return address. The wrapper qualifies (may
 * sleep), then calls the original directly: that call comes from inside
 * this module, so the callback lets it through (the recursion guard). The
 * originals are exported and called directly, so no sealed ENDBR is ever
 * the target of an indirect branch (IBT).
 *
 * Unload: each redirected call holds a reference on the module from the
 * callback (try_module_get, which fails once rmmod started: the call then
 * runs the original unhooked) to the wrapper's end, so rmmod fails with
 * EBUSY while a task is inside a wrapper -- including a server blocked in
 * accept(), which would otherwise hold the unload indefinitely. The
 * in-flight count is the second line: unregister_ftrace_function() waits
 * until no CPU runs the callback, so every redirected call was counted
 * first, and tb_net_hooks_stop() waits until the count falls to zero. (The
 * wrapper's last instructions after its module_put() are covered by the
 * grace periods of the unregistration and free_module() on this
 * non-preemptible kernel.)
 */

static atomic_t tb_net_inflight = ATOMIC_INIT(0);
static DECLARE_WAIT_QUEUE_HEAD(tb_net_drained);

static void tb_net_leave(void)
{
	if (atomic_dec_and_test(&tb_net_inflight))
		wake_up(&tb_net_drained);
	module_put(THIS_MODULE);
}

/*
 * Sockets between their handshake and their channel key (a bound connect,
 * Rust's net::connect_bound): another thread of the program may already
 * send on such a socket, and TCP would send that as plaintext. The set of
 * held sockets is Rust's (trustbind_hold_*, proto/src/hold.rs;
 * lock-free). A bound connect enters the socket (tb_connect_hold) before
 * inet_stream_connect() takes the socket lock to send the SYN, and leaves
 * (tb_connect_unhold) once the key is installed (or the connection
 * reset). A send reaches tcp_sendmsg_locked() with the socket lock held:
 * if the SYN went out before, the hold is visible to it there (the lock
 * orders the two), so a callback on tcp_sendmsg_locked() catches every
 * send on a held socket, whenever it started (T-40), and sends it back to
 * restart once the socket is bound (tb_tcp_sendmsg_held). A send that
 * took the lock before the SYN found the socket unconnected and failed
 * (EPIPE). The wait queue is woken at every leave.
 *
 * The connect wrapper (and fast open's) hands the connect to Rust
 * (trustbind_connect), which qualifies it and connects a bound channel
 * itself through the one-line calls below; a plain one it hands back
 * (TB_CONNECT_PLAIN) for the wrapper to run the original.
 */
static DECLARE_WAIT_QUEUE_HEAD(tb_bound_wq);

static unsigned long tb_sk_id(const struct sock *sk)
{
	return (unsigned long)sk;
}

/* A user-space stream socket of IPv4/IPv6: TCP, or MPTCP (whose connect is
 * inet_stream_connect() too; its accept is wrapped apart). An MPTCP socket
 * can never be a bound channel (no kTLS on it): Rust refuses one that must
 * be (tb_sock_is_mptcp). */
static bool tb_net_watched(const struct sock *sk)
{
	return sk && (sk->sk_protocol == IPPROTO_TCP ||
		      sk->sk_protocol == IPPROTO_MPTCP) && !sk->sk_kern_sock &&
	       (sk->sk_family == AF_INET || sk->sk_family == AF_INET6);
}

/* One end of sk into addr/port: the local (bound) one, or the peer of a
 * connected sk. */
static void tb_sock_end(const struct sock *sk, bool peer, u8 *addr, u16 *port)
{
	const struct inet_sock *inet = inet_sk(sk);

#if IS_ENABLED(CONFIG_IPV6)
	if (sk->sk_family == AF_INET6)
		memcpy(addr, peer ? &sk->sk_v6_daddr : &sk->sk_v6_rcv_saddr, 16);
	else
#endif
		memcpy(addr, peer ? &inet->inet_daddr : &inet->inet_rcv_saddr, 4);
	*port = ntohs(peer ? inet->inet_dport : inet->inet_sport);
}

int tb_connect_info(struct socket *sock, void *uaddr, int addr_len,
		    struct tb_net_info *info)
{
	struct sock *sk = sock->sk;
	struct sockaddr *sa = uaddr;

	memset(info, 0, sizeof(*info));
	/* Only the connect that sends the SYN: not a non-blocking connect's
	 * later calls, a disconnect (AF_UNSPEC) or an address the protocol
	 * refuses anyway. */
	if (!tb_net_watched(sk) || READ_ONCE(sock->state) != SS_UNCONNECTED ||
	    !sa || addr_len < (int)sizeof(sa_family_t) ||
	    sa->sa_family != sk->sk_family)
		return 0;
	info->kind = TB_NET_CONNECT;
	if (sa->sa_family == AF_INET &&
	    addr_len >= (int)sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *sin = uaddr;

		info->family = 4;
		memcpy(info->dst_addr, &sin->sin_addr, 4);
		info->dst_port = ntohs(sin->sin_port);
	} else if (sa->sa_family == AF_INET6 &&
		   addr_len >= SIN6_LEN_RFC2133) {
		const struct sockaddr_in6 *sin6 = uaddr;

		info->family = 6;
		memcpy(info->dst_addr, &sin6->sin6_addr, 16);
		info->dst_port = ntohs(sin6->sin6_port);
	}
	if (!info->family)
		return 0;
	tb_sock_end(sk, false, info->src_addr, &info->src_port);
	TB_FILL_TASK(info);
	info->net = sock_net(sk)->net_cookie;
	info->sock = sock;
	return 1;
}

int tb_connect_call(struct socket *sock, void *uaddr, int addr_len, int flags)
{
	return inet_stream_connect(sock, uaddr, addr_len, flags);
}

int tb_connect_hold(struct socket *sock)
{
	/* No fast open: TCP_FASTOPEN_CONNECT would defer the SYN to the
	 * first send, before the key. */
	inet_clear_bit(DEFER_CONNECT, sock->sk);
	if (wait_event_interruptible(tb_bound_wq,
				     trustbind_hold_enter(tb_sk_id(sock->sk))))
		return -ERESTARTSYS;
	return 0;
}

void tb_connect_unhold(struct socket *sock)
{
	trustbind_hold_leave(tb_sk_id(sock->sk));
	wake_up_all(&tb_bound_wq);
}

void tb_connect_abandon(struct socket *sock)
{
	if (READ_ONCE(sock->state) == SS_CONNECTING)
		tb_sock_abort(sock, ECONNABORTED);
}

void tb_connect_established(struct socket *sock, struct tb_net_info *info)
{
	struct sock *sk = sock->sk;

	info->kind = TB_NET_ESTABLISHED;
	info->bind = 0;
	info->family = sk->sk_family == AF_INET6 ? 6 : 4;
	tb_sock_end(sk, false, info->src_addr, &info->src_port);
	tb_sock_end(sk, true, info->dst_addr, &info->dst_port);
}

bool tb_sock_is_mptcp(const struct socket *sock)
{
	return sock->sk->sk_protocol == IPPROTO_MPTCP;
}

static int tb_inet_stream_connect(struct socket *sock, struct sockaddr *uaddr,
				  int addr_len, int flags)
{
	int err = trustbind_connect(sock, uaddr, addr_len, flags);

	if (err == TB_CONNECT_PLAIN)
		err = inet_stream_connect(sock, uaddr, addr_len, flags);
	tb_net_leave();
	return err;
}

/*
 * TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected socket connects
 * through tcp_sendmsg_fastopen() and __inet_stream_connect(), never
 * inet_stream_connect(). The tcp_sendmsg() hook redirects only such calls
 * (the callback looks at the flag first: every other send runs the
 * original at the cost of that one test). The connect is qualified as
 * any: refused with EACCES; a plain connection keeps fast open; a bound
 * channel connects as connect() would, then the data goes out as its
 * first TLS record.
 */
static int tb_tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
{
	struct socket *sock = sk->sk_socket;
	int err;

	if (!sock) {
		err = tcp_sendmsg(sk, msg, size);
		goto out;
	}
	err = trustbind_connect(sock, msg->msg_name, msg->msg_namelen,
				(msg->msg_flags & MSG_DONTWAIT) ? O_NONBLOCK : 0);
	if (err == TB_CONNECT_PLAIN) {
		err = tcp_sendmsg(sk, msg, size);
	} else if (!err) {
		msg->msg_flags &= ~MSG_FASTOPEN;
		/* The kTLS send of the now bound socket. */
		err = READ_ONCE(sk->sk_prot)->sendmsg(sk, msg, size);
	}
out:
	tb_net_leave();
	return err;
}

/*
 * A send on a held socket, or plain TCP's send on a socket that is kTLS by
 * now (tcp_sendmsg_locked() hook, socket lock held): nothing is sent; the
 * task restarts the system call after a task work waited, with no lock
 * held, until the socket is bound or reset, and the restarted send goes
 * through the socket's protocol of then (kTLS). Also when the hold was
 * left between the callback and here: this call runs plain TCP's send,
 * which must not carry a bound socket's data. A call that cannot be
 * restarted (io_uring, a kernel caller, a compat system call) fails with
 * EAGAIN instead, never sent.
 */
/* The system call the current task is in, if -ERESTARTNOINTR can restart
 * it (a user task's native system call); -1 otherwise. */
static long tb_restartable_nr(void)
{
	if (current->flags & (PF_KTHREAD | PF_IO_WORKER | PF_EXITING) ||
	    in_compat_syscall())
		return -1;
	return syscall_get_nr(current, task_pt_regs(current));
}

static bool tb_send_restartable(void)
{
	switch (tb_restartable_nr()) {
	case __NR_write:
	case __NR_writev:
	case __NR_sendto:
	case __NR_sendmsg:
	case __NR_sendmmsg:
	case __NR_sendfile:
	case __NR_splice:
		return true;
	}
	return false;
}

struct tb_send_work {
	struct callback_head cb;
	struct sock *sk;
};

static void tb_send_work_fn(struct callback_head *cb)
{
	struct tb_send_work *w = container_of(cb, struct tb_send_work, cb);

	/* Interrupted: the restarted send is caught again if still held. */
	if (wait_event_interruptible(tb_bound_wq,
				     !trustbind_send_held(tb_sk_id(w->sk))))
		;
	sock_put(w->sk);
	kfree(w);
	module_put(THIS_MODULE);
}

static int tb_tcp_sendmsg_held(struct sock *sk, struct msghdr *msg,
			       size_t size)
{
	struct tb_send_work *w = NULL;
	int err = -EAGAIN;

	trustbind_send_restarted();
	if (!tb_send_restartable() || !try_module_get(THIS_MODULE))
		goto out;
	/* Socket lock held: no reclaim that could wait on this socket. */
	w = kmalloc(sizeof(*w), GFP_NOWAIT | __GFP_NOWARN);
	if (!w)
		goto put;
	w->sk = sk;
	init_task_work(&w->cb, tb_send_work_fn);
	if (task_work_add(current, &w->cb, TWA_SIGNAL))
		goto put;
	sock_hold(sk);
	err = -ERESTARTNOINTR;
	goto out;
put:
	kfree(w);
	module_put(THIS_MODULE);
out:
	tb_net_leave();
	return err;
}

typedef int (*tb_accept_fn)(struct socket *, struct socket *,
			    struct proto_accept_arg *);

int tb_accept_info(struct socket *newsock, struct tb_net_info *info)
{
	struct sock *sk = newsock->sk;

	memset(info, 0, sizeof(*info));
	if (!tb_net_watched(sk))
		return 0;
	info->kind = TB_NET_ACCEPT;
	info->family = sk->sk_family == AF_INET6 ? 6 : 4;
	tb_sock_end(sk, true, info->src_addr, &info->src_port);
	tb_sock_end(sk, false, info->dst_addr, &info->dst_port);
	TB_FILL_TASK(info);
	info->net = sock_net(sk)->net_cookie;
	info->sock = newsock;
	return 1;
}

/* A refused accept: the caller (do_accept, kernel_accept) releases newsock
 * on an error; without linger the close resets the connection, so the
 * client sees it. (A partly bound socket cannot disconnect: the reset
 * comes from the close.) */
void tb_accept_refuse(struct socket *newsock)
{
	sock_no_linger(newsock->sk);
}

static tb_accept_fn tb_mptcp_accept_orig;

int tb_accept_call(struct socket *sock, struct socket *newsock, void *arg,
		   bool mptcp)
{
	return mptcp ? tb_mptcp_accept_orig(sock, newsock, arg) :
		       inet_accept(sock, newsock, arg);
}

bool tb_sock_listening(const struct socket *sock)
{
	return READ_ONCE(sock->sk->sk_state) == TCP_LISTEN;
}

/*
 * TCP and MPTCP accepts: Rust runs them (trustbind_accept). A connection
 * decided aside for this listener (T-37) is handed out first. A blocking
 * accept (or a kernel one, or an MPTCP one) waits for its verdict. A
 * non-blocking TCP one sets each connection that needs a verdict aside
 * and takes the next from the queue, until the queue is empty: -EAGAIN,
 * and the program's event loop goes on; the listener is woken as each
 * verdict allows one.
 */
static int tb_inet_accept(struct socket *sock, struct socket *newsock,
			  struct proto_accept_arg *arg)
{
	int err = trustbind_accept(sock, newsock, arg,
				   (arg->flags & O_NONBLOCK) && !arg->kern,
				   false);

	tb_net_leave();
	return err;
}

/* Moves from's connection to the empty socket to, as __inet_accept()
 * grafts one (with what it set from the listener), leaving from empty. */
static void tb_conn_move(struct socket *from, struct socket *to)
{
	struct sock *sk = from->sk;

	if (test_bit(SOCK_SUPPORT_ZC, &from->flags))
		set_bit(SOCK_SUPPORT_ZC, &to->flags);
	lock_sock(sk);
	sock_graft(sk, to);
	to->state = SS_CONNECTED;
	from->sk = NULL;
	from->state = SS_UNCONNECTED;
	release_sock(sk);
}

int tb_accept_hold(struct socket *newsock, struct socket **held)
{
	struct sock *sk = newsock->sk;
	int err;

	/* As kernel_accept() makes its new socket. */
	err = sock_create_lite(sk->sk_family, newsock->type, sk->sk_protocol,
			       held);
	if (err)
		return err;
	(*held)->ops = newsock->ops;
	__module_get((*held)->ops->owner);
	tb_conn_move(newsock, *held);
	return 0;
}

void tb_accept_give(struct socket *held, struct socket *newsock)
{
	/* As __inet_accept() does, in the accepting task. */
	sock_rps_record_flow(held->sk);
	tb_conn_move(held, newsock);
	/* No sk: only the socket itself and its module reference go. */
	sock_release(held);
}

void tb_accept_drop(struct socket *held)
{
	sock_no_linger(held->sk);
	sock_release(held);
}

struct tb_accept_work {
	struct work_struct work;
	void *job;
};

static void tb_accept_work_fn(struct work_struct *work)
{
	struct tb_accept_work *w = container_of(work, struct tb_accept_work,
						work);

	trustbind_accept_run(w->job);
	kfree(w);
	module_put(THIS_MODULE);
}

int tb_accept_defer(void *job)
{
	struct tb_accept_work *w;

	if (!try_module_get(THIS_MODULE))
		return -ENODEV;
	w = kmalloc(sizeof(*w), GFP_KERNEL);
	if (!w) {
		module_put(THIS_MODULE);
		return -ENOMEM;
	}
	INIT_WORK(&w->work, tb_accept_work_fn);
	w->job = job;
	queue_work(system_unbound_wq, &w->work);
	return 0;
}

void tb_sk_wake(unsigned long sk_id)
{
	struct sock *sk = (struct sock *)sk_id;

	sk->sk_data_ready(sk);
}

/* A listener's poll(): readable also while a connection decided aside
 * waits for its accept (its accept queue may be empty). */
static __poll_t tb_tcp_poll(struct file *file, struct socket *sock,
			    poll_table *wait)
{
	__poll_t mask = tcp_poll(file, sock, wait);

	if (READ_ONCE(sock->sk->sk_state) == TCP_LISTEN &&
	    trustbind_accept_ready(tb_sk_id(sock->sk)))
		mask |= EPOLLIN | EPOLLRDNORM;
	tb_net_leave();
	return mask;
}

/* MPTCP's accept (mptcp_stream_accept, not exported: found through a
 * kernel MPTCP socket's ops and called through that pointer, an
 * address-taken function whose ENDBR is intact). */
static int tb_mptcp_accept(struct socket *sock, struct socket *newsock,
			   struct proto_accept_arg *arg)
{
	int err = trustbind_accept(sock, newsock, arg, false, true);

	tb_net_leave();
	return err;
}

int tb_ktls_prepare(struct socket *sock)
{
	static const char ulp[] = "tls";

	if (READ_ONCE(inet_csk(sock->sk)->icsk_ulp_ops))
		return -EEXIST;
	return sock->ops->setsockopt(sock, SOL_TCP, TCP_ULP,
				     KERNEL_SOCKPTR((void *)ulp), sizeof(ulp));
}

int tb_ktls_install(struct socket *sock, struct tb_channel_key *key)
{
	struct tls12_crypto_info_aes_gcm_256 ci;
	int err;

	BUILD_BUG_ON(sizeof(ci.key) != sizeof(key->tx_key));
	BUILD_BUG_ON(sizeof(ci.salt) != sizeof(key->tx_salt));
	BUILD_BUG_ON(sizeof(ci.iv) != sizeof(key->tx_iv));
	memset(&ci, 0, sizeof(ci));
	/* Usually attached already (tb_ktls_prepare); if another ULP is,
	 * TLS_TX below fails. */
	err = tb_ktls_prepare(sock);
	if (err && err != -EEXIST)
		goto out;
	ci.info.version = key->tls12 ? TLS_1_2_VERSION : TLS_1_3_VERSION;
	ci.info.cipher_type = TLS_CIPHER_AES_GCM_256;
	memcpy(ci.key, key->tx_key, sizeof(ci.key));
	memcpy(ci.salt, key->tx_salt, sizeof(ci.salt));
	memcpy(ci.iv, key->tx_iv, sizeof(ci.iv));
	err = sock->ops->setsockopt(sock, SOL_TLS, TLS_TX, KERNEL_SOCKPTR(&ci),
				    sizeof(ci));
	if (err)
		goto out;
	memcpy(ci.key, key->rx_key, sizeof(ci.key));
	memcpy(ci.salt, key->rx_salt, sizeof(ci.salt));
	memcpy(ci.iv, key->rx_iv, sizeof(ci.iv));
	err = sock->ops->setsockopt(sock, SOL_TLS, TLS_RX, KERNEL_SOCKPTR(&ci),
				    sizeof(ci));
out:
	memzero_explicit(&ci, sizeof(ci));
	memzero_explicit(key, sizeof(*key));
	return err;
}

int tb_ticket_send(struct socket *sock, const u8 *buf, u32 len)
{
	struct kvec v = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr msg = { .msg_flags = MSG_DONTWAIT | MSG_NOSIGNAL };
	int sent;

	iov_iter_kvec(&msg.msg_iter, ITER_SOURCE, &v, 1, len);
	lock_sock(sock->sk);
	/* Called from this module: the tcp_sendmsg_locked() hook lets it
	 * through although the socket is held. */
	sent = tcp_sendmsg_locked(sock->sk, &msg, len);
	release_sock(sock->sk);
	if (sent < 0)
		return sent;
	return (u32)sent == len ? 0 : -EAGAIN;
}

void tb_tcp_isns(struct socket *sock, u32 *local, u32 *remote)
{
	const struct tcp_sock *tp = tcp_sk(sock->sk);

	lock_sock(sock->sk);
	*local = READ_ONCE(tp->write_seq) - 1;
	*remote = READ_ONCE(tp->copied_seq) - 1;
	release_sock(sock->sk);
}

static int tb_recv(struct socket *sock, u8 *buf, u32 len, int flags)
{
	struct kvec v = { .iov_base = buf, .iov_len = len };
	struct msghdr msg = { 0 };

	return kernel_recvmsg(sock, &msg, &v, 1, len, flags | MSG_WAITALL);
}

int tb_ticket_read(struct socket *sock, u8 *buf, u32 len, const u8 *magic,
		   u32 timeout_ms)
{
	struct sock *sk = sock->sk;
	long saved = READ_ONCE(sk->sk_rcvtimeo);
	int n, err;

	if (len < 4)
		return -EINVAL;
	/* The program has not got the socket yet: its timeout is ours. */
	WRITE_ONCE(sk->sk_rcvtimeo, msecs_to_jiffies(timeout_ms) ?: 1);
	n = tb_recv(sock, buf, 4, MSG_PEEK);
	if (n == 4 && memcmp(buf, magic, 4)) {
		err = 0;
		goto out;
	}
	if (n != 4) {
		/* Nothing (or less than the magic) in time: no ticket. */
		err = n < 0 && n != -EAGAIN ? n : -ETIMEDOUT;
		goto out;
	}
	/* A ticket: all of it must come now (a stream cut short in it is
	 * refused, never asked about as if none came). */
	n = tb_recv(sock, buf, len, 0);
	err = n >= 0 && (u32)n == len ? 1 : -EPROTO;
out:
	WRITE_ONCE(sk->sk_rcvtimeo, saved);
	return err;
}

void tb_random(u8 *buf, u32 len)
{
	get_random_bytes(buf, len);
}

u64 tb_real_seconds(void)
{
	return ktime_get_real_seconds();
}

int tb_listen_info(struct socket *sock, struct tb_net_info *info)
{
	struct sock *sk = sock->sk;

	memset(info, 0, sizeof(*info));
	if (!tb_net_watched(sk) || sk->sk_protocol != IPPROTO_TCP ||
	    READ_ONCE(sk->sk_state) != TCP_LISTEN)
		return 0;
	info->kind = TB_NET_LISTEN;
	info->family = sk->sk_family == AF_INET6 ? 6 : 4;
	tb_sock_end(sk, false, info->dst_addr, &info->dst_port);
	TB_FILL_TASK(info);
	info->net = sock_net(sk)->net_cookie;
	info->sock = sock;
	return 1;
}

static int tb_inet_listen(struct socket *sock, int backlog)
{
	int err = inet_listen(sock, backlog);

	if (!err)
		trustbind_listen(sock);
	tb_net_leave();
	return err;
}

void tb_sock_abort(struct socket *sock, int err)
{
	tcp_abort(sock->sk, err);
}

/* --- Netfilter backstop -------------------------------------------------- */

/*
 * A non-sleeping second line behind the connect/accept wrappers, on every
 * packet a local socket sends (NF_INET_LOCAL_OUT, IPv4 and IPv6, each
 * network namespace, before conntrack and NAT so addresses are the ones
 * the socket named):
 *  - a SYN to a protected service from a socket no wrapper qualified (a
 *    raw socket, a socket of an exempt process) is dropped;
 *  - a segment with payload to a protected service, or from a protected
 *    service on this host, is dropped unless its socket carries kTLS
 *    transmit state or its wrapper allowed it in plaintext (a connection
 *    opened before the module qualified connects, or with the agent
 *    away in permissive mode, that would now speak plaintext).
 * Protected services are the ends (address, port) of connections whose
 * verdict required a channel: the peer of a bound connect, the local end
 * of a bound accept; kept across policy generations (T-29), forgotten
 * when the backstop is switched off. Each
 * socket a wrapper allowed is marked (TB_MARK_*) until its connection
 * ends: past tcp_close(), until TCP_CLOSE (see tb_backstop_closing).
 * Off in disabled mode or while the agent does not qualify connections;
 * in permissive mode a drop is only counted (would_drop).
 *
 * Only the kernel's side is here: the hooks and their registration, the
 * packet parsing, the sending socket's facts, the mark sweep's delayed
 * work and the socket references marks hold. What to do with a packet
 * (proto/src/backstop.rs), the protected services and hosts (net.rs) and
 * the marks themselves (a lock-free map, proto/src/marks.rs, kept in
 * sys/mod.rs: set, looked up, swept, drained) are Rust's.
 */

static atomic_t tb_backstop_mode = ATOMIC_INIT(TB_BACKSTOP_OFF);

static struct {
	atomic64_t syn_dropped, payload_dropped, inbound_dropped, would_drop,
		key_reads_refused;
} tb_bs;

void tb_backstop_set_mode(u32 mode)
{
	atomic_set(&tb_backstop_mode, mode);
}

bool tb_sock_is_tcp(const struct socket *sock)
{
	return sock->sk->sk_protocol == IPPROTO_TCP;
}

bool tb_sk_closed(unsigned long sk_id)
{
	return inet_sk_state_load((struct sock *)sk_id) == TCP_CLOSE;
}

/*
 * A closed socket's connection goes on until TCP_CLOSE (queued data, FIN,
 * retransmissions) while kTLS already freed its state: its mark stays,
 * holding the socket, and this sweep (each second while any such mark
 * exists; Rust decides, sys/mod.rs) drops the marks of connections that
 * reached TCP_CLOSE.
 */
static void tb_mark_gc_fn(struct work_struct *work);
static DECLARE_DELAYED_WORK(tb_mark_gc, tb_mark_gc_fn);
static bool tb_mark_gc_stopped;

static void tb_mark_gc_fn(struct work_struct *work)
{
	if (trustbind_mark_gc() && !READ_ONCE(tb_mark_gc_stopped))
		schedule_delayed_work(&tb_mark_gc, HZ);
}

/* tcp_close() of sk begins: its mark (if any) now covers what the closed
 * connection still sends, until TCP_CLOSE, holding a reference on sk so
 * its address is not reused meanwhile. */
static void tb_backstop_closing(struct sock *sk)
{
	sock_hold(sk);
	if (!trustbind_mark_closing((unsigned long)sk)) {
		sock_put(sk);
		return;
	}
	if (!READ_ONCE(tb_mark_gc_stopped))
		schedule_delayed_work(&tb_mark_gc, HZ);
}

static void tb_backstop_free(void)
{
	WRITE_ONCE(tb_mark_gc_stopped, true);
	cancel_delayed_work_sync(&tb_mark_gc);
	trustbind_mark_drain();
}

/* Whether sk sends through kTLS (transmit state installed). Under RCU: the
 * TLS context is freed after a grace period (tls_ctx_free). */
static bool tb_tls_tx(const struct sock *sk)
{
	const struct inet_connection_sock *icsk = inet_csk(sk);
	const struct tcp_ulp_ops *ulp = READ_ONCE(icsk->icsk_ulp_ops);
	const struct tls_context *ctx;

	if (!ulp || strcmp(ulp->name, "tls"))
		return false;
	ctx = (__force const struct tls_context *)READ_ONCE(icsk->icsk_ulp_data);
	return ctx && ctx->tx_conf != TLS_BASE;
}

/* Fills *p from skb (an IPv4 or IPv6 packet, pf); false if it is not a
 * TCP segment with a readable header (not the first fragment: passed). */
static bool tb_pkt_parse(struct sk_buff *skb, u8 pf, struct tb_bs_pkt *p)
{
	struct tcphdr _th;
	const struct tcphdr *th;
	int thoff;

	if (pf == NFPROTO_IPV4) {
		const struct iphdr *iph = ip_hdr(skb);

		if (iph->protocol != IPPROTO_TCP ||
		    (ntohs(iph->frag_off) & IP_OFFSET))
			return false;
		p->family = 4;
		memcpy(p->saddr, &iph->saddr, 4);
		memcpy(p->daddr, &iph->daddr, 4);
		thoff = skb_network_offset(skb) + iph->ihl * 4;
	} else {
		const struct ipv6hdr *ip6 = ipv6_hdr(skb);
		u8 nexthdr = ip6->nexthdr;
		__be16 frag_off;

		thoff = ipv6_skip_exthdr(skb,
					 skb_network_offset(skb) + sizeof(*ip6),
					 &nexthdr, &frag_off);
		if (thoff < 0 || nexthdr != IPPROTO_TCP ||
		    (ntohs(frag_off) & ~0x7))
			return false;
		p->family = 6;
		memcpy(p->saddr, &ip6->saddr, 16);
		memcpy(p->daddr, &ip6->daddr, 16);
	}
	th = skb_header_pointer(skb, thoff, sizeof(_th), &_th);
	if (!th)
		return false;
	p->sport = ntohs(th->source);
	p->dport = ntohs(th->dest);
	p->syn = th->syn && !th->ack;
	p->payload = skb->len > thoff + th->doff * 4;
	return true;
}

/* The socket lookup proto::backstop asks for (kmod/sys/mod.rs, BsFacts);
 * called from the hooks, under netfilter's RCU read section. */
void tb_bs_sender(const struct tb_bs_pkt *p, struct tb_bs_sender *out)
{
	const struct sock *sk = p->sk;

	memset(out, 0, sizeof(*out));
	if (sk && !sk_fullsock(sk))
		sk = NULL;
	/* The kernel's own (NFS, iSCSI ...), but not an MPTCP subflow: those
	 * carry a user socket's data and are never qualified themselves. */
	if (sk && sk->sk_kern_sock &&
	    !(sk->sk_protocol == IPPROTO_TCP && sk_is_mptcp(sk))) {
		out->kind = TB_SENDER_KERNEL;
		return;
	}
	if (!sk || sk->sk_type != SOCK_STREAM ||
	    sk->sk_protocol != IPPROTO_TCP) {
		out->kind = TB_SENDER_UNQUALIFIABLE;
		return;
	}
	out->kind = TB_SENDER_TCP;
	out->tls_tx = tb_tls_tx(sk);
}

/* Counts and logs what Rust decided about p (TB_BS_*); the verdict. */
static unsigned int tb_bs_apply(u32 outcome, const struct tb_bs_pkt *p,
				bool inbound)
{
	const char *what, *why;

	if (outcome == TB_BS_PASS)
		return NF_ACCEPT;
	if (outcome == TB_BS_WOULD_DROP) {
		atomic64_inc(&tb_bs.would_drop);
		return NF_ACCEPT;
	}
	if (inbound) {
		atomic64_inc(&tb_bs.inbound_dropped);
		what = "an inbound SYN";
		why = "not from a protected host";
	} else if (p->syn) {
		atomic64_inc(&tb_bs.syn_dropped);
		what = "a SYN";
		why = "not from a qualified socket";
	} else {
		atomic64_inc(&tb_bs.payload_dropped);
		what = "a segment";
		why = "plaintext to a protected service";
	}
	if (p->family == 4)
		pr_info_ratelimited("backstop dropped %s %pI4:%u -> %pI4:%u (%s)\n",
				    what, p->saddr, p->sport, p->daddr,
				    p->dport, why);
	else
		pr_info_ratelimited("backstop dropped %s [%pI6c]:%u -> [%pI6c]:%u (%s)\n",
				    what, p->saddr, p->sport, p->daddr,
				    p->dport, why);
	return NF_DROP;
}

/* Fills *p for skb; false when there is nothing to decide (the backstop
 * is off or nothing is protected: nothing to parse; not a TCP segment). */
static bool tb_bs_packet(struct sk_buff *skb,
			 const struct nf_hook_state *state,
			 struct tb_bs_pkt *p)
{
	memset(p, 0, sizeof(*p));
	p->mode = atomic_read(&tb_backstop_mode);
	if (p->mode == TB_BACKSTOP_OFF || !trustbind_backstop_armed() ||
	    !tb_pkt_parse(skb, state->pf, p))
		return false;
	p->net = state->net->net_cookie;
	return true;
}

/* Outgoing: what a local socket sends, decided by proto::backstop. */
static unsigned int tb_backstop_hook(void *priv, struct sk_buff *skb,
				     const struct nf_hook_state *state)
{
	struct tb_bs_pkt p;

	if (!tb_bs_packet(skb, state, &p))
		return NF_ACCEPT;
	p.sk = skb_to_full_sk(skb);
	return tb_bs_apply(trustbind_backstop_out(&p), &p, false);
}

/*
 * Inbound: a SYN to a protected service of this host from an address that
 * is no protected host (the agent's Peers record: every host the
 * appliance knows an agent of) cannot belong to a qualified connection:
 * dropped before the handshake. Loopback is left to the connect side.
 * Until the first Peers record nothing inbound is dropped (the accept
 * wrapper still resets such a connection before a byte is read).
 */
/* Incoming: a SYN to this host, decided by proto::backstop. */
static unsigned int tb_backstop_in_hook(void *priv, struct sk_buff *skb,
					const struct nf_hook_state *state)
{
	struct tb_bs_pkt p;

	if (!tb_bs_packet(skb, state, &p))
		return NF_ACCEPT;
	p.loopback = state->in && (state->in->flags & IFF_LOOPBACK);
	return tb_bs_apply(trustbind_backstop_in(&p), &p, true);
}

static const struct nf_hook_ops tb_backstop_ops[] = {
	{
		.hook = tb_backstop_hook,
		.pf = NFPROTO_IPV4,
		.hooknum = NF_INET_LOCAL_OUT,
		.priority = NF_IP_PRI_RAW,
	},
#if IS_ENABLED(CONFIG_IPV6)
	{
		.hook = tb_backstop_hook,
		.pf = NFPROTO_IPV6,
		.hooknum = NF_INET_LOCAL_OUT,
		.priority = NF_IP6_PRI_RAW,
	},
#endif
	{
		.hook = tb_backstop_in_hook,
		.pf = NFPROTO_IPV4,
		.hooknum = NF_INET_LOCAL_IN,
		.priority = NF_IP_PRI_RAW,
	},
#if IS_ENABLED(CONFIG_IPV6)
	{
		.hook = tb_backstop_in_hook,
		.pf = NFPROTO_IPV6,
		.hooknum = NF_INET_LOCAL_IN,
		.priority = NF_IP6_PRI_RAW,
	},
#endif
};

static int __net_init tb_backstop_net_init(struct net *net)
{
	return nf_register_net_hooks(net, tb_backstop_ops,
				     ARRAY_SIZE(tb_backstop_ops));
}

static void __net_exit tb_backstop_net_exit(struct net *net)
{
	nf_unregister_net_hooks(net, tb_backstop_ops,
				ARRAY_SIZE(tb_backstop_ops));
}

static struct pernet_operations tb_backstop_net_ops = {
	.init = tb_backstop_net_init,
	.exit = tb_backstop_net_exit,
};

static int tb_marked_get(void *data, u64 *val)
{
	*val = trustbind_mark_count();
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(tb_marked_fops, tb_marked_get, NULL, "%llu\n");

void tb_backstop_debugfs(struct dentry *dir)
{
	if (!dir)
		return;
	/* Read as plain u64 (atomic64_t's counter): a torn read is
	 * impossible on 64-bit. */
	debugfs_create_u64("net_backstop_syn_dropped", 0400, dir,
			   (u64 *)&tb_bs.syn_dropped.counter);
	debugfs_create_u64("net_backstop_payload_dropped", 0400, dir,
			   (u64 *)&tb_bs.payload_dropped.counter);
	debugfs_create_u64("net_backstop_inbound_dropped", 0400, dir,
			   (u64 *)&tb_bs.inbound_dropped.counter);
	debugfs_create_u64("net_backstop_would_drop", 0400, dir,
			   (u64 *)&tb_bs.would_drop.counter);
	debugfs_create_u64("net_key_reads_refused", 0400, dir,
			   (u64 *)&tb_bs.key_reads_refused.counter);
	debugfs_create_file_unsafe("net_backstop_marked", 0400, dir, NULL,
				   &tb_marked_fops);
}

unsigned long tb_sock_id(const struct socket *sock)
{
	return (unsigned long)sock->sk;
}

/*
 * Bound sockets by identity (net.rs keeps a reference on each socket it
 * remembers, so the identity stays a live struct sock until it lets go).
 */
void tb_sock_ref(unsigned long sk_id)
{
	sock_hold((struct sock *)sk_id);
}

void tb_sock_unref(unsigned long sk_id)
{
	sock_put((struct sock *)sk_id);
}

void tb_sock_counts(unsigned long sk_id, struct tb_tcp_counts *out)
{
	const struct tcp_sock *tp = tcp_sk((struct sock *)sk_id);

	out->bytes_sent = READ_ONCE(tp->bytes_sent);
	out->bytes_received = READ_ONCE(tp->bytes_received);
	out->write_seq = READ_ONCE(tp->write_seq);
	out->snd_nxt = READ_ONCE(tp->snd_nxt);
}

void tb_sock_idle_end(unsigned long sk_id)
{
	struct sock *sk = (struct sock *)sk_id;

	/* Resets the peer; the program's next call fails with ETIMEDOUT. (A
	 * connection already gone, e.g. reset by the other end's sweep, is
	 * left as it is.) */
	if (inet_sk_state_load(sk) != TCP_CLOSE)
		tcp_abort(sk, ETIMEDOUT);
}

/*
 * The idle sweep: once a second while some bound socket has an idle
 * timeout (net.rs arms it when it binds one, and the sweep re-arms itself
 * while any is left). Cancelled at unload after the wrappers drained.
 */
static void tb_idle_fn(struct work_struct *work);
static DECLARE_DELAYED_WORK(tb_idle_work, tb_idle_fn);
static bool tb_idle_stopped;

static void tb_idle_fn(struct work_struct *work)
{
	if (trustbind_net_idle() && !READ_ONCE(tb_idle_stopped))
		schedule_delayed_work(&tb_idle_work, HZ);
}

void tb_idle_kick(void)
{
	if (!READ_ONCE(tb_idle_stopped))
		schedule_delayed_work(&tb_idle_work, HZ);
}

/*
 * Channel close: every TCP socket ends in tcp_close() -- a kTLS one too
 * (tls_sk_proto_close() frees the TLS state and then calls it through the
 * saved proto), a plain one from inet_release(). The wrapper holds the
 * sock across the original, which may send queued data and the FIN, then
 * reads the byte counters and reports; the hold keeps the address from
 * being reused for another socket until the report is done. Most sockets
 * were never bound: net.rs answers those from an atomic count before any
 * lock.
 */
static void tb_tcp_close(struct sock *sk, long timeout)
{
	struct tb_tcp_counts counts;

	sock_hold(sk);
	tb_backstop_closing(sk);
	tcp_close(sk, timeout);
	tb_sock_counts((unsigned long)sk, &counts);
	trustbind_net_closed((unsigned long)sk, &counts);
	sock_put(sk);
	tb_net_leave();
}

/* --- UNIX-domain connect qualification ------------------------------------ */

/*
 * unix_stream_connect() (static; stream and seqpacket sockets) is found
 * through a kernel AF_UNIX socket's ops at start and hooked by address
 * with the same redirecting callback, in-flight count and module
 * reference as the inet hooks. The wrapper calls it through the saved
 * pointer (an indirect call to a function whose address is taken: its
 * ENDBR is intact, IBT-safe); that call comes from this module, so the
 * callback lets it run (the recursion guard).
 *
 * The listener is only found inside the original, under the two sockets'
 * state locks, where nothing may wait for the agent. So the pair is
 * decided before the connection exists, in rounds that Rust runs
 * (trustbind_unix_connect, proto/src/unixconnect.rs; T-20): each round
 * calls the original (tb_unix_connect_round); the exported
 * security_unix_stream_connect(), called by it with the listener in hand
 * and wrapped below, asks Rust (trustbind_unix_reached) whether that
 * listener is the approved one, and otherwise fails with TB_UNIX_ASK
 * before anything is queued; Rust then asks about the listener with no
 * lock held (tb_unix_ask) and runs another round if it is allowed.
 */

typedef int (*tb_connect_fn)(struct socket *, struct sockaddr *, int, int);

static tb_connect_fn tb_unix_connect_orig;

#define TB_UNIX_ASK (-EAGAIN)

int tb_unix_connect_round(struct socket *sock, void *uaddr, int addr_len,
			  int flags)
{
	return tb_unix_connect_orig(sock, uaddr, addr_len, flags);
}

/* The process behind sk's SO_PEERCRED (set at listen() for a listener,
 * at connect() for either end of a connection), ids in the init user
 * namespace. tgid 0: no such process any more. */
struct tb_peer {
	u32 uid, euid, gid, egid;
	u32 tgid, ptgid;
	u32 loginuid, sessionid;
	u64 start_ns, pstart_ns;
};

static void tb_sk_peer(struct sock *sk, struct tb_peer *out)
{
	const struct cred *cred;
	struct task_struct *t, *parent;
	struct pid *pid;

	memset(out, 0, sizeof(*out));
	spin_lock(&sk->sk_peer_lock);
	pid = get_pid(sk->sk_peer_pid);
	cred = get_cred(sk->sk_peer_cred);
	spin_unlock(&sk->sk_peer_lock);
	if (cred) {
		out->uid = from_kuid(&init_user_ns, cred->uid);
		out->euid = from_kuid(&init_user_ns, cred->euid);
		out->gid = from_kgid(&init_user_ns, cred->gid);
		out->egid = from_kgid(&init_user_ns, cred->egid);
		put_cred(cred);
	}
	rcu_read_lock();
	t = pid ? pid_task(pid, PIDTYPE_TGID) : NULL;
	if (t) {
		out->tgid = task_tgid_nr(t);
		out->start_ns = t->group_leader->start_boottime;
		out->loginuid = from_kuid(&init_user_ns, audit_get_loginuid(t));
		out->sessionid = audit_get_sessionid(t);
		parent = rcu_dereference(t->real_parent);
		out->ptgid = task_tgid_nr(parent);
		out->pstart_ns = parent->group_leader->start_boottime;
	}
	rcu_read_unlock();
	put_pid(pid);
}

/* The listener's name (path or abstract) and owner into *info. */
static int tb_unix_fill(struct sock *peer, struct tb_unix_info *info)
{
	struct unix_sock *pu = unix_sk(peer);
	struct unix_address *addr;
	struct path path = {};
	struct tb_peer owner;
	u32 n = 0;

	unix_state_lock(peer);
	if (pu->path.dentry) {
		path = pu->path;
		path_get(&path);
	} else {
		/* Abstract: the name as bound, its leading NUL included
		 * (Rust shows it as "@name", proto/src/addr.rs). */
		addr = smp_load_acquire(&pu->addr);
		if (addr && addr->len > offsetof(struct sockaddr_un, sun_path) + 1) {
			n = min_t(u32, addr->len -
				       offsetof(struct sockaddr_un, sun_path),
				  sizeof(info->path));
			memcpy(info->path, addr->name->sun_path, n);
		}
	}
	unix_state_unlock(peer);
	if (path.dentry) {
		char *p = d_path(&path, (char *)info->path, sizeof(info->path));

		path_put(&path);
		if (IS_ERR(p))
			return PTR_ERR(p);
		n = strlen(p);
		memmove(info->path, p, n);
	}
	info->path_len = n;

	/* A listener's peer credentials are its owner's, set at listen(). */
	tb_sk_peer(peer, &owner);
	info->peer_uid = owner.euid;
	info->peer_gid = owner.egid;
	info->peer_tgid = owner.tgid;
	info->peer_start_ns = owner.start_ns;
	info->peer_ptgid = owner.ptgid;
	info->peer_pstart_ns = owner.pstart_ns;
	return 0;
}

int tb_unix_ask(unsigned long listener)
{
	struct tb_unix_info *info = kzalloc(sizeof(*info), GFP_KERNEL);
	int err;

	if (!info)
		return -ENOMEM;
	TB_FILL_TASK(info);
	err = tb_unix_fill((struct sock *)listener, info);
	if (!err)
		err = trustbind_unix_check(info);
	kfree(info);
	return err;
}

static int tb_unix_stream_connect(struct socket *sock, struct sockaddr *uaddr,
				  int addr_len, int flags)
{
	int err;

	if (!sock->sk || sock->sk->sk_kern_sock)
		err = tb_unix_connect_orig(sock, uaddr, addr_len, flags);
	else
		err = trustbind_unix_connect(sock, uaddr, addr_len, flags,
					     task_tgid_nr(current),
					     (unsigned long)current);
	tb_net_leave();
	return err;
}

/*
 * unix_accept() (stream and seqpacket; found through a kernel socket's ops
 * like the connect): Rust decides whether the accepted connection is asked
 * about again (trustbind_unix_accept(), T-21); a refusal fails accept()
 * with ECONNABORTED and the caller releases newsock, so the client sees
 * it closed before the acceptor read a byte.
 */
static tb_accept_fn tb_unix_accept_orig;

void tb_sk_owner(unsigned long sk, u32 *tgid, u64 *start_ns)
{
	struct tb_peer p;

	tb_sk_peer((struct sock *)sk, &p);
	*tgid = p.tgid;
	*start_ns = p.start_ns;
}

int tb_unix_accept_ask(unsigned long listener, unsigned long newsk)
{
	struct tb_unix_info *info = kzalloc(sizeof(*info), GFP_KERNEL);
	struct task_struct *parent;
	struct tb_peer p;
	int err;

	if (!info)
		return -ENOMEM;
	/* The name; the server is then the acceptor (current). */
	err = tb_unix_fill((struct sock *)listener, info);
	if (err)
		goto out;
	info->at_accept = 1;
	info->peer_uid = from_kuid(&init_user_ns, current_euid());
	info->peer_gid = from_kgid(&init_user_ns, current_egid());
	info->peer_tgid = task_tgid_nr(current);
	info->peer_start_ns = current->group_leader->start_boottime;
	rcu_read_lock();
	parent = rcu_dereference(current->real_parent);
	info->peer_ptgid = task_tgid_nr(parent);
	info->peer_pstart_ns = parent->group_leader->start_boottime;
	rcu_read_unlock();
	/* The client: the connection's peer, set at connect(). */
	tb_sk_peer((struct sock *)newsk, &p);
	info->uid = p.uid;
	info->euid = p.euid;
	info->gid = p.gid;
	info->loginuid = p.loginuid;
	info->sessionid = p.sessionid;
	info->tgid = p.tgid;
	info->start_ns = p.start_ns;
	info->ptgid = p.ptgid;
	info->pstart_ns = p.pstart_ns;
	err = trustbind_unix_check(info);
out:
	kfree(info);
	return err;
}

static int tb_unix_accept(struct socket *sock, struct socket *newsock,
			  struct proto_accept_arg *arg)
{
	int err = tb_unix_accept_orig(sock, newsock, arg);

	if (!err && !sock->sk->sk_kern_sock)
		err = trustbind_unix_accept((unsigned long)sock->sk,
					    (unsigned long)newsock->sk,
					    task_tgid_nr(current),
					    current->group_leader->start_boottime);
	tb_net_leave();
	return err;
}

/* security_unix_stream_connect(sk, other, newsk), called by
 * unix_stream_connect() with both sockets' state locks held: a connect in
 * its rounds passes only to the listener Rust approved; Rust holds any
 * other for the next round to ask about. */
static int tb_unix_security_connect(struct sock *sk, struct sock *other,
				    struct sock *newsk)
{
	int err = 0;

	if (!trustbind_unix_reached((unsigned long)sk, (unsigned long)current,
				    (unsigned long)other))
		err = TB_UNIX_ASK;
	if (!err)
		err = security_unix_stream_connect(sk, other, newsk);
	tb_net_leave();
	return err;
}

/*
 * getsockopt(SOL_TLS, TLS_TX/TLS_RX) hands the socket's owner the kTLS
 * key, salt and IV (do_tls_getsockopt_conf). On a socket the module keyed
 * (marked bound before the key went in) it is refused: a channel key is
 * never readable from user space. Every other option, and every other
 * socket (an application's own kTLS), is untouched. io_uring's getsockopt
 * goes through do_sock_getsockopt() too.
 */
static int tb_do_sock_getsockopt(struct socket *sock, bool compat, int level,
				 int optname, sockptr_t optval,
				 sockptr_t optlen)
{
	int err;

	if (level == SOL_TLS && (optname == TLS_TX || optname == TLS_RX) &&
	    sock->sk &&
	    trustbind_mark_of((unsigned long)sock->sk) == TB_MARK_BOUND) {
		atomic64_inc(&tb_bs.key_reads_refused);
		err = -EPERM;
	} else {
		err = do_sock_getsockopt(sock, compat, level, optname, optval,
					 optlen);
	}
	tb_net_leave();
	return err;
}

static void notrace tb_net_redirect(unsigned long ip, unsigned long parent_ip,
				    struct ftrace_ops *op,
				    struct ftrace_regs *fregs)
{
	/* The wrapper's own call of the original runs it as it is. */
	if (within_module(parent_ip, THIS_MODULE))
		return;
	if (!try_module_get(THIS_MODULE))
		return;
	atomic_inc(&tb_net_inflight);
	ftrace_regs_set_instruction_pointer(fregs, (unsigned long)op->private);
}

/* tcp_sendmsg(sk, msg, size): redirected only for a fast open send. */
static void notrace tb_sendmsg_redirect(unsigned long ip,
					unsigned long parent_ip,
					struct ftrace_ops *op,
					struct ftrace_regs *fregs)
{
	const struct msghdr *msg =
		(const void *)ftrace_regs_get_argument(fregs, 1);

	if (likely(!(READ_ONCE(msg->msg_flags) & MSG_FASTOPEN)))
		return;
	tb_net_redirect(ip, parent_ip, op, fregs);
}

/* tcp_poll(file, sock, wait): redirected only while some connection
 * decided aside is ready, and only for a listener. */
static void notrace tb_poll_redirect(unsigned long ip, unsigned long parent_ip,
				     struct ftrace_ops *op,
				     struct ftrace_regs *fregs)
{
	const struct socket *sock =
		(const void *)ftrace_regs_get_argument(fregs, 1);

	if (likely(!trustbind_accept_any()))
		return;
	if (READ_ONCE(sock->sk->sk_state) != TCP_LISTEN)
		return;
	tb_net_redirect(ip, parent_ip, op, fregs);
}

/* The end of tcp_sendmsg()'s code (tb_net_hooks_start): a return address
 * in [tcp_sendmsg, end) is its call of tcp_sendmsg_locked(). */
static unsigned long tb_tcp_sendmsg_end;

/* tcp_sendmsg_locked(sk, msg, size), socket lock held: redirected
 * (tb_tcp_sendmsg_held) for a held socket, and for plain TCP's send on a
 * socket whose protocol is kTLS by now: a send that read the socket's
 * protocol (inet_sendmsg) before the key was installed and took the lock
 * after, which would put plaintext into the TLS stream. kTLS's own sends
 * come from tls_push_sg(). A few loads on every other send. */
static void notrace tb_sendmsg_locked_redirect(unsigned long ip,
					       unsigned long parent_ip,
					       struct ftrace_ops *op,
					       struct ftrace_regs *fregs)
{
	struct sock *sk = (struct sock *)ftrace_regs_get_argument(fregs, 0);
	bool stale = parent_ip > (unsigned long)tcp_sendmsg &&
		     parent_ip < tb_tcp_sendmsg_end &&
		     READ_ONCE(sk->sk_prot)->sendmsg != tcp_sendmsg &&
		     tb_tls_tx(sk);

	if (!stale && (likely(!trustbind_hold_any()) ||
		       !trustbind_send_held(tb_sk_id(sk))))
		return;
	tb_net_redirect(ip, parent_ip, op, fregs);
}

/* Finds tb_tcp_sendmsg_end from kallsyms ("tcp_sendmsg+0x0/0x5d"). */
static int tb_find_tcp_sendmsg_end(void)
{
	char buf[KSYM_SYMBOL_LEN];
	const char *slash;
	unsigned long size;

	sprint_symbol(buf, (unsigned long)tcp_sendmsg);
	slash = strchr(buf, '/');
	if (!slash || kstrtoul(slash + 1, 16, &size) || !size) {
		pr_err("cannot find the size of tcp_sendmsg (%s)\n", buf);
		return -ENOENT;
	}
	tb_tcp_sendmsg_end = (unsigned long)tcp_sendmsg + size;
	return 0;
}

static struct ftrace_ops tb_connect_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_inet_stream_connect,
};

static struct ftrace_ops tb_listen_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_inet_listen,
};

static struct ftrace_ops tb_accept_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_inet_accept,
};

static struct ftrace_ops tb_poll_ops = {
	.func = tb_poll_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_tcp_poll,
};

static struct ftrace_ops tb_sendmsg_ops = {
	.func = tb_sendmsg_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_tcp_sendmsg,
};

static struct ftrace_ops tb_sendmsg_locked_ops = {
	.func = tb_sendmsg_locked_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_tcp_sendmsg_held,
};

static struct ftrace_ops tb_mptcp_accept_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_mptcp_accept,
};

static struct ftrace_ops tb_getsockopt_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_do_sock_getsockopt,
};

static struct ftrace_ops tb_close_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_tcp_close,
};

static struct ftrace_ops tb_unix_accept_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_unix_accept,
};

static struct ftrace_ops tb_unix_connect_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_unix_stream_connect,
};

static struct ftrace_ops tb_unix_security_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_unix_security_connect,
};

static int tb_hook_one(struct ftrace_ops *ops, const char *name)
{
	char buf[32];
	int err;

	strscpy(buf, name, sizeof(buf));
	err = ftrace_set_filter(ops, (unsigned char *)buf, strlen(buf), 1);
	if (err) {
		pr_err("cannot filter ftrace on %s: %d\n", name, err);
		return err;
	}
	err = register_ftrace_function(ops);
	if (err) {
		pr_err("cannot hook %s: %d\n", name, err);
		ftrace_free_filter(ops);
	}
	return err;
}

static void tb_unhook_one(struct ftrace_ops *ops)
{
	unregister_ftrace_function(ops);
	ftrace_free_filter(ops);
}

/* Like tb_hook_one, for a function found by address (a proto_ops member of
 * a kernel socket: not exported, its address taken, ENDBR intact). */
static int tb_hook_ip(struct ftrace_ops *ops, void *fn, const char *what)
{
	int err = ftrace_set_filter_ip(ops, (unsigned long)fn, 0, 0);

	if (!err)
		err = register_ftrace_function(ops);
	if (err) {
		pr_err("cannot hook %ps: %d\n", fn, err);
		ftrace_free_filter(ops);
		return err;
	}
	pr_info("hooked %ps for %s\n", fn, what);
	return 0;
}

/* Hooks MPTCP's accept where the kernel has MPTCP (else nothing to do). */
static int tb_mptcp_hook_start(void)
{
	struct socket *sock;
	int err;

	if (sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_MPTCP,
			     &sock))
		return 0;
	tb_mptcp_accept_orig = sock->ops->accept;
	sock_release(sock);
	err = tb_hook_ip(&tb_mptcp_accept_ops, tb_mptcp_accept_orig,
			 "MPTCP accepts");
	if (err)
		tb_mptcp_accept_orig = NULL;
	return err;
}

int tb_net_hooks_start(void)
{
	int err = tb_find_tcp_sendmsg_end();

	if (err)
		return err;
	err = register_pernet_subsys(&tb_backstop_net_ops);
	if (err) {
		pr_err("cannot register the netfilter backstop: %d\n", err);
		return err;
	}
	err = tb_hook_one(&tb_connect_ops, "inet_stream_connect");
	if (err)
		goto unregister;
	err = tb_hook_one(&tb_accept_ops, "inet_accept");
	if (err)
		goto unhook_connect;
	err = tb_hook_one(&tb_sendmsg_ops, "tcp_sendmsg");
	if (err)
		goto unhook_accept;
	err = tb_hook_one(&tb_sendmsg_locked_ops, "tcp_sendmsg_locked");
	if (err)
		goto unhook_sendmsg;
	err = tb_hook_one(&tb_close_ops, "tcp_close");
	if (err)
		goto unhook_sendmsg_locked;
	err = tb_hook_one(&tb_getsockopt_ops, "do_sock_getsockopt");
	if (err)
		goto unhook_close;
	err = tb_hook_one(&tb_poll_ops, "tcp_poll");
	if (err)
		goto unhook_getsockopt;
	err = tb_hook_one(&tb_listen_ops, "inet_listen");
	if (err)
		goto unhook_poll;
	err = tb_mptcp_hook_start();
	if (!err)
		return 0;
	tb_unhook_one(&tb_listen_ops);
unhook_poll:
	tb_unhook_one(&tb_poll_ops);
unhook_getsockopt:
	tb_unhook_one(&tb_getsockopt_ops);
unhook_close:
	tb_unhook_one(&tb_close_ops);
unhook_sendmsg_locked:
	tb_unhook_one(&tb_sendmsg_locked_ops);
unhook_sendmsg:
	tb_unhook_one(&tb_sendmsg_ops);
unhook_accept:
	tb_unhook_one(&tb_accept_ops);
unhook_connect:
	tb_unhook_one(&tb_connect_ops);
	wait_event(tb_net_drained, !atomic_read(&tb_net_inflight));
unregister:
	unregister_pernet_subsys(&tb_backstop_net_ops);
	tb_backstop_free();
	return err;
}

void tb_net_hooks_stop(void)
{
	if (tb_mptcp_accept_orig)
		tb_unhook_one(&tb_mptcp_accept_ops);
	tb_unhook_one(&tb_listen_ops);
	tb_unhook_one(&tb_poll_ops);
	tb_unhook_one(&tb_getsockopt_ops);
	tb_unhook_one(&tb_close_ops);
	tb_unhook_one(&tb_sendmsg_locked_ops);
	tb_unhook_one(&tb_sendmsg_ops);
	tb_unhook_one(&tb_accept_ops);
	tb_unhook_one(&tb_connect_ops);
	wait_event(tb_net_drained, !atomic_read(&tb_net_inflight));
	/* No wrapper binds a socket any more: stop the idle sweep. */
	WRITE_ONCE(tb_idle_stopped, true);
	cancel_delayed_work_sync(&tb_idle_work);
	/* No wrapper marks or unmarks any more; the netfilter hooks go
	 * (after a grace period), then the tables. */
	unregister_pernet_subsys(&tb_backstop_net_ops);
	tb_backstop_free();
}

int tb_unix_hooks_start(void)
{
	struct socket *sock;
	int err;

	err = sock_create_kern(&init_net, AF_UNIX, SOCK_STREAM, 0, &sock);
	if (err) {
		pr_err("cannot create a UNIX socket to find its connect: %d\n",
		       err);
		return err;
	}
	tb_unix_connect_orig = sock->ops->connect;
	tb_unix_accept_orig = sock->ops->accept;
	sock_release(sock);
	/* CONFIG_SECURITY_NETWORK (on in distribution kernels) provides it:
	 * without it no UNIX connect can be decided before it exists. */
	err = tb_hook_one(&tb_unix_security_ops, "security_unix_stream_connect");
	if (err)
		return err;
	err = tb_hook_ip(&tb_unix_connect_ops, tb_unix_connect_orig,
			 "UNIX connects");
	if (err)
		goto fail_connect;
	err = tb_hook_ip(&tb_unix_accept_ops, tb_unix_accept_orig,
			 "UNIX accepts");
	if (err)
		goto fail_accept;
	return 0;
fail_accept:
	tb_unhook_one(&tb_unix_connect_ops);
fail_connect:
	tb_unhook_one(&tb_unix_security_ops);
	return err;
}

void tb_unix_hooks_stop(void)
{
	tb_unhook_one(&tb_unix_accept_ops);
	tb_unhook_one(&tb_unix_connect_ops);
	tb_unhook_one(&tb_unix_security_ops);
	wait_event(tb_net_drained, !atomic_read(&tb_net_inflight));
}


/* --- Loader gate (ftrace IPMODIFY wrapper on open_exec()) ----------------- */

/*
 * Inside an execve, the files the exec opens itself once under way -- the
 * ELF PT_INTERP loader, a `#!` interpreter, a binfmt_misc interpreter --
 * are opened with the exported open_exec(). Its wrapper runs the original,
 * then (in an exec, with no lock of the VFS or fsnotify held: only the
 * exec'ing process's own cred_guard_mutex, as for the binfmt handler)
 * asks Rust about the file it opened. Whatever file system the file is on,
 * and however it got there (a bind mount in a user namespace, FUSE), it is
 * seen; nothing is marked and nothing waits inside an SRCU section.
 */
static struct file *tb_open_exec(const char *name)
{
	struct file *f = open_exec(name);
	int err;

	if (!IS_ERR(f) && current->in_execve) {
		err = trustbind_loader_check(f);
		if (err) {
			exe_file_allow_write_access(f);
			fput(f);
			f = ERR_PTR(err);
		}
	}
	tb_net_leave();
	return f;
}

static struct ftrace_ops tb_open_exec_ops = {
	.func = tb_net_redirect,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_open_exec,
};

/*
 * The process events the lineage table follows (proto/src/lineage.rs):
 * sched_process_fork (a new process gets its parent's entry),
 * sched_process_exec (fires once an exec has passed its point of no
 * return and the new program is loaded, and only then: lineage is
 * recorded here, never for an exec that failed) and sched_process_exit
 * (the whole thread group is gone). All three are process context with
 * preemption disabled: the Rust side does not sleep.
 */
static struct tracepoint *tb_tp_exec, *tb_tp_fork, *tb_tp_exit;

static void tb_find_tp(struct tracepoint *tp, void *priv)
{
	if (!strcmp(tp->name, "sched_process_exec"))
		tb_tp_exec = tp;
	else if (!strcmp(tp->name, "sched_process_fork"))
		tb_tp_fork = tp;
	else if (!strcmp(tp->name, "sched_process_exit"))
		tb_tp_exit = tp;
}

static void tb_exec_committed(void *data, struct task_struct *p,
			      pid_t old_pid, struct linux_binprm *bprm)
{
	/* p is current, now the group leader (de_thread gave it the
	 * leader's start time). */
	trustbind_exec_committed(old_pid, p->tgid,
				 p->group_leader->start_boottime);
}

static void tb_proc_forked(void *data, struct task_struct *parent,
			   struct task_struct *child)
{
	/* A new thread of the same process runs the same image. The child
	 * runs what the forking task runs (with CLONE_PARENT too). */
	if (child->tgid == parent->tgid)
		return;
	trustbind_proc_forked(parent->tgid,
			      parent->group_leader->start_boottime, child->tgid,
			      child->start_boottime);
}

static void tb_proc_exit(void *data, struct task_struct *p)
{
	/* do_exit() decremented signal->live before this tracepoint: 0 means
	 * the last thread of the group is exiting (two threads exiting at
	 * once may both see 0: removing twice is harmless). */
	if (atomic_read(&p->signal->live))
		return;
	trustbind_proc_exited(p->tgid, p->group_leader->start_boottime);
}

/*
 * PR_SET_MM_EXE_FILE and PR_SET_MM_MAP (with an exe fd) both change
 * mm->exe_file through replace_mm_exe_file(). It is only called directly,
 * so under IBT its ENDBR is sealed and a wrapper could not call it: the
 * decision is taken in the ftrace callback itself (no sleeping), which
 * redirects a refused call to tb_replace_exe_refused() and otherwise lets
 * the original run untouched.
 */
static int tb_replace_exe_refused(struct mm_struct *mm, struct file *file)
{
	pr_warn_ratelimited("exe_file change refused: pid %d (%s)\n",
			    task_tgid_nr(current), current->comm);
	tb_net_leave();
	return -EPERM;
}

static void notrace tb_exe_replace_gate(unsigned long ip,
					unsigned long parent_ip,
					struct ftrace_ops *op,
					struct ftrace_regs *fregs)
{
	if (trustbind_exe_replace_allowed())
		return;
	tb_net_redirect(ip, parent_ip, op, fregs);
}

static struct ftrace_ops tb_exe_replace_ops = {
	.func = tb_exe_replace_gate,
	.flags = FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT,
	.private = tb_replace_exe_refused,
};

static void tb_tp_unregister_all(void)
{
	if (tb_tp_exec)
		tracepoint_probe_unregister(tb_tp_exec, tb_exec_committed, NULL);
	if (tb_tp_fork)
		tracepoint_probe_unregister(tb_tp_fork, tb_proc_forked, NULL);
	if (tb_tp_exit)
		tracepoint_probe_unregister(tb_tp_exit, tb_proc_exit, NULL);
	tracepoint_synchronize_unregister();
}

int tb_loader_hooks_start(void)
{
	int err;

	for_each_kernel_tracepoint(tb_find_tp, NULL);
	if (!tb_tp_exec || !tb_tp_fork || !tb_tp_exit) {
		pr_err("no sched_process_exec/fork/exit tracepoint\n");
		return -ENOENT;
	}
	/* Exit first, then fork, then exec: no entry is made whose removal
	 * could be missed. */
	err = tracepoint_probe_register(tb_tp_exit, tb_proc_exit, NULL);
	if (err) {
		pr_err("cannot attach to sched_process_exit: %d\n", err);
		tb_tp_exit = NULL;
		goto fail;
	}
	err = tracepoint_probe_register(tb_tp_fork, tb_proc_forked, NULL);
	if (err) {
		pr_err("cannot attach to sched_process_fork: %d\n", err);
		tb_tp_fork = NULL;
		goto fail;
	}
	err = tracepoint_probe_register(tb_tp_exec, tb_exec_committed, NULL);
	if (err) {
		pr_err("cannot attach to sched_process_exec: %d\n", err);
		tb_tp_exec = NULL;
		goto fail;
	}
	err = tb_hook_one(&tb_open_exec_ops, "open_exec");
	if (err)
		goto fail;
	err = tb_hook_one(&tb_exe_replace_ops, "replace_mm_exe_file");
	if (err) {
		tb_unhook_one(&tb_open_exec_ops);
		goto fail;
	}
	return 0;
fail:
	tb_tp_unregister_all();
	return err;
}

void tb_loader_hooks_stop(void)
{
	tb_unhook_one(&tb_exe_replace_ops);
	tb_unhook_one(&tb_open_exec_ops);
	wait_event(tb_net_drained, !atomic_read(&tb_net_inflight));
	tb_tp_unregister_all();
}


/* --- File gate (ftrace callbacks on the LSM entry points) ---------------- */

/*
 * The same table carries one hook that is not about files: the entry of
 * security_socket_create(), where a user socket the PEM cannot qualify
 * (SMC) is refused by the same redirect while connections are qualified
 * (trustbind_socket_create(), proto::unqualifiable).
 */

/*
 * The gate decides in the ftrace callback at the entry of the LSM hooks
 * below (preemption disabled; for unlink, rename, link and the creates a
 * directory's i_rwsem is held by the caller): from the protected set, the
 * verdict cache and the answers, never waiting. A refusal redirects the
 * call to tb_file_refused() (the hook then returns -EACCES and the VFS
 * fails the operation); an allowed call runs the original untouched, so
 * nothing calls these (possibly IBT-sealed) functions indirectly.
 *
 * A miss is asked later, with nothing held: a task work (TWA_SIGNAL, so
 * the return to user space goes through the signal path, which restarts
 * the call) is queued with references on the dentries, and the call is
 * redirected to tb_file_restart(), which returns -ERESTARTNOINTR. The task
 * work asks the agent (it may sleep; no lock of the VFS is held), stores
 * the verdict, and the system call starts again and finds it. Only system
 * calls that can be restarted so are (tb_file_restartable()): in any other
 * context (io_uring workers, compat calls, kernel-internal callers) a miss
 * is decided by mode without asking. Kernel threads (nfsd, ksmbd, kworkers)
 * are not gated.
 */
void tb_current_ids(struct tb_task_ids *out)
{
	TB_FILL_TASK(out);
	out->pid = task_pid_nr(current);
}

/*
 * The device stat(2) reports for inode (of dentry d, pinned by the
 * caller): its super block's, except on btrfs, where each subvolume
 * reports an anonymous device of its own (T-98). btrfs_getattr() reads
 * the inode and takes a spinlock, never sleeps, and does not look at
 * path->mnt (6.12), so it is called here directly with no mount; a
 * failure falls back to the super block's.
 */
static u64 tb_inode_dev(const struct dentry *d, struct inode *inode)
{
	if (inode->i_sb->s_magic == BTRFS_SUPER_MAGIC && inode->i_op->getattr) {
		struct path p = { .dentry = (struct dentry *)d };
		struct kstat st = {};

		if (!inode->i_op->getattr(&nop_mnt_idmap, &p, &st, STATX_INO,
					  AT_STATX_DONT_SYNC) && st.dev)
			return new_encode_dev(st.dev);
	}
	return new_encode_dev(inode->i_sb->s_dev);
}

u64 tb_dentry_dev(const struct dentry *d)
{
	if (d->d_sb->s_magic == BTRFS_SUPER_MAGIC)
		return 0;
	return new_encode_dev(d->d_sb->s_dev);
}

/* Init's (pid 1's) root, referenced. */
static int tb_init_root(struct path *root)
{
	/* pid 1 never exits (the kernel panics), so its task is not pinned. */
	struct task_struct *init = READ_ONCE(init_pid_ns.child_reaper);

	if (!init)
		return -ESRCH;
	task_lock(init);
	if (!init->fs) {
		task_unlock(init);
		return -ESRCH;
	}
	get_fs_root(init->fs, root);
	task_unlock(init);
	return 0;
}

int tb_init_path_ident(const char *path, u64 *dev, u64 *ino, bool *dir)
{
	struct path root, p;
	int err = tb_init_root(&root);

	if (err)
		return err;
	/* An absolute path starts at root, and so do absolute symlinks. */
	err = vfs_path_lookup(root.dentry, root.mnt, path, LOOKUP_FOLLOW, &p);
	path_put(&root);
	if (err)
		return err;
	*dev = tb_inode_dev(p.dentry, d_inode(p.dentry));
	*ino = d_inode(p.dentry)->i_ino;
	*dir = d_is_dir(p.dentry);
	path_put(&p);
	return 0;
}

ssize_t tb_init_mountinfo(char *buf, size_t len)
{
	struct path root;
	struct file *f;
	loff_t pos = 0;
	ssize_t total = 0;
	int err = tb_init_root(&root);

	if (err)
		return err;
	f = file_open_root(&root, "/proc/1/mountinfo", O_RDONLY, 0);
	path_put(&root);
	if (IS_ERR(f))
		return PTR_ERR(f);
	while ((size_t)total < len) {
		ssize_t n = kernel_read(f, buf + total, len - total, &pos);

		if (n < 0)
			total = n;
		if (n <= 0)
			break;
		total += n;
	}
	fput(f);
	if ((size_t)total == len)
		return -E2BIG;
	return total;
}

bool tb_dentry_ident(const struct dentry *d, bool parent, u64 *dev,
		     u64 *fs_dev, u64 *ino, u32 *gen)
{
	struct inode *inode;
	bool ok = false;

	rcu_read_lock();
	if (parent)
		d = READ_ONCE(d->d_parent);
	inode = d_inode_rcu(d);
	if (inode) {
		*dev = tb_inode_dev(d, inode);
		*fs_dev = new_encode_dev(d->d_sb->s_dev);
		*ino = inode->i_ino;
		*gen = inode->i_generation;
		ok = true;
	}
	rcu_read_unlock();
	return ok;
}

int tb_dentry_chain(const struct dentry *d, bool from_parent, u64 *inos,
		    u64 *devs, int max, u32 *tree)
{
	const struct dentry *p;
	unsigned int seq;
	int n;

	rcu_read_lock();
	do {
		seq = read_seqbegin(&rename_lock);
		p = from_parent ? READ_ONCE(d->d_parent) : d;
		n = 0;
		for (;;) {
			struct inode *inode = d_inode_rcu(p);
			const struct dentry *up;

			if (inode) {
				if (n == max) {
					n = max + 1;
					break;
				}
				if (devs)
					devs[n] = tb_inode_dev(p, inode);
				inos[n++] = inode->i_ino;
			}
			up = READ_ONCE(p->d_parent);
			if (up == p) {
				/* A disconnected dentry (open_by_handle_at)
				 * does not reach the root: its place in the
				 * tree is unknown, so fail closed. */
				if (p != p->d_sb->s_root)
					n = max + 1;
				break;
			}
			p = up;
		}
	} while (read_seqretry(&rename_lock, seq));
	rcu_read_unlock();
	if (tree)
		*tree = seq;
	return n;
}

bool tb_dentry_place(const struct dentry *d, bool from_parent, u64 *ino,
		     u64 *parent_ino, u64 *gens, u32 *tree)
{
	const struct dentry *p, *q;
	const struct super_block *sb;
	struct inode *pi, *qi;
	unsigned int seq;
	bool ok = false;

	rcu_read_lock();
	seq = read_seqbegin(&rename_lock);
	p = from_parent ? READ_ONCE(d->d_parent) : d;
	q = READ_ONCE(p->d_parent);
	sb = p->d_sb;
	pi = d_inode_rcu(p);
	qi = d_inode_rcu(q);
	if (pi && qi && q != p && (sb->s_bdev || sb->s_magic == TMPFS_MAGIC)) {
		*ino = pi->i_ino;
		*parent_ino = qi->i_ino;
		*gens = (u64)pi->i_generation << 32 | qi->i_generation;
		*tree = seq;
		ok = !read_seqretry(&rename_lock, seq);
	}
	rcu_read_unlock();
	return ok;
}

int tb_dentry_path(const struct dentry *d, char *buf, int len,
		   const char **out)
{
	char *p = dentry_path_raw(d, buf, len);

	if (IS_ERR(p))
		return PTR_ERR(p);
	*out = p;
	return buf + len - 1 - p;
}

static bool tb_file_restartable(void)
{
	switch (tb_restartable_nr()) {
#ifdef __NR_open
	case __NR_open:
#endif
#ifdef __NR_creat
	case __NR_creat:
#endif
#ifdef __NR_unlink
	case __NR_unlink:
#endif
#ifdef __NR_rmdir
	case __NR_rmdir:
#endif
#ifdef __NR_rename
	case __NR_rename:
#endif
#ifdef __NR_renameat
	case __NR_renameat:
#endif
#ifdef __NR_link
	case __NR_link:
#endif
#ifdef __NR_mkdir
	case __NR_mkdir:
#endif
#ifdef __NR_mknod
	case __NR_mknod:
#endif
#ifdef __NR_symlink
	case __NR_symlink:
#endif
	case __NR_openat:
	case __NR_openat2:
	case __NR_open_by_handle_at:
	case __NR_unlinkat:
	case __NR_renameat2:
	case __NR_linkat:
	case __NR_mkdirat:
	case __NR_mknodat:
	case __NR_symlinkat:
	case __NR_truncate:
		return true;
	}
	return false;
}

struct tb_file_work {
	struct callback_head cb;
	struct tb_file_op op;
};

static void tb_file_work_fn(struct callback_head *cb)
{
	struct tb_file_work *w = container_of(cb, struct tb_file_work, cb);

	if (!(current->flags & PF_EXITING) && !fatal_signal_pending(current))
		trustbind_file_ask(&w->op);
	dput(w->op.d);
	dput(w->op.d2);
	kfree(w);
	module_put(THIS_MODULE);
}

/* Queues the question for the return to user space; 0 or -errno. */
static int tb_file_ask_later(const struct tb_file_op *op)
{
	struct tb_file_work *w;
	int err;

	if (!try_module_get(THIS_MODULE))
		return -ENODEV;
	w = kmalloc(sizeof(*w), GFP_NOWAIT | __GFP_NOWARN);
	if (!w) {
		module_put(THIS_MODULE);
		return -ENOMEM;
	}
	w->op = *op;
	init_task_work(&w->cb, tb_file_work_fn);
	err = task_work_add(current, &w->cb, TWA_SIGNAL);
	if (err) {
		kfree(w);
		module_put(THIS_MODULE);
		return err;
	}
	/* The work runs in this task, later: the references are taken
	 * only once it is sure to run (dput may sleep, so none is dropped
	 * here). */
	dget(w->op.d);
	if (w->op.d2)
		dget(w->op.d2);
	return 0;
}

static int tb_file_restart(void)
{
	tb_net_leave();
	return -ERESTARTNOINTR;
}

static int tb_file_refused(void)
{
	tb_net_leave();
	return -EACCES;
}

static void notrace tb_file_redirect(struct ftrace_regs *fregs, void *to)
{
	if (!try_module_get(THIS_MODULE))
		return;
	atomic_inc(&tb_net_inflight);
	ftrace_regs_set_instruction_pointer(fregs, (unsigned long)to);
}

static void notrace tb_file_decide(struct ftrace_regs *fregs,
				   struct tb_file_op *op)
{
	int r;

	r = trustbind_file_gate(op);
	if (r == TB_GATE_PASS)
		return;
	if (r == TB_GATE_ASK) {
		/* Asked only on a miss: most calls never need to know. */
		if (tb_file_restartable() && !tb_file_ask_later(op)) {
			tb_file_redirect(fregs, tb_file_restart);
			return;
		}
		r = trustbind_file_unasked(op);
		if (!r)
			return;
	}
	tb_file_redirect(fregs, tb_file_refused);
}

enum tb_fhook_kind {
	TB_FH_OPEN,		/* security_file_open(file) */
	TB_FH_NEW1,		/* (dir, dentry, ...): a new name, arg 1 */
	TB_FH_DELETE1,		/* (dir, dentry): arg 1 removed */
	TB_FH_RMDIR,		/* TB_FH_DELETE1, arg 1 a directory */
	TB_FH_RENAME,		/* (old_dir, old, new_dir, new, flags) */
	TB_FH_LINK,		/* (old, dir, new) */
	TB_FH_SETATTR,		/* (idmap, dentry, iattr) */
	TB_FH_SOCKET,		/* security_socket_create(family, type, proto, kern) */
};

struct tb_fhook {
	struct ftrace_ops ops;
	const char *name;
	enum tb_fhook_kind kind;
	bool optional;		/* absent without CONFIG_SECURITY_PATH */
};

static bool tb_fhook_on[12];

static void notrace tb_file_hook(unsigned long ip, unsigned long parent_ip,
				 struct ftrace_ops *ops,
				 struct ftrace_regs *fregs)
{
	struct tb_fhook *h = container_of(ops, struct tb_fhook, ops);
	struct tb_file_op op = {};
	const struct file *f;
	const struct iattr *ia;

	/* Kernel threads' too (nfsd): the gate's remembered places must not
	 * outlive a directory whose inode number comes back elsewhere. */
	if (h->kind == TB_FH_RMDIR)
		trustbind_file_dir_removed();
	if (current->flags & PF_KTHREAD)
		return;
	switch (h->kind) {
	case TB_FH_SOCKET:
		/* Not a file: a socket the PEM cannot qualify (SMC). Kernel
		 * sockets (kern) are the kernel's own. */
		if (!ftrace_regs_get_argument(fregs, 3) &&
		    trustbind_socket_create(
			    (int)ftrace_regs_get_argument(fregs, 0),
			    (int)ftrace_regs_get_argument(fregs, 2)))
			tb_file_redirect(fregs, tb_file_refused);
		return;
	case TB_FH_OPEN:
		f = (const void *)ftrace_regs_get_argument(fregs, 0);
		/* An exec's own open is the exec's to decide; a file this
		 * open created was decided as a new name. */
		if ((f->f_mode & FMODE_EXEC) ||
		    ((f->f_mode & FMODE_CREATED) && tb_fhook_on[1]))
			return;
		if (!(f->f_mode & (FMODE_READ | FMODE_WRITE)))
			return;
		op.op = TB_FOP_OPEN;
		op.d = f->f_path.dentry;
		op.write = !!(f->f_mode & FMODE_WRITE);
		op.trunc = !!(f->f_flags & O_TRUNC);
		break;
	case TB_FH_NEW1:
		op.op = TB_FOP_NEW;
		op.d = (void *)ftrace_regs_get_argument(fregs, 1);
		break;
	case TB_FH_DELETE1:
	case TB_FH_RMDIR:
		op.op = TB_FOP_DELETE;
		op.d = (void *)ftrace_regs_get_argument(fregs, 1);
		break;
	case TB_FH_RENAME:
		op.op = TB_FOP_RENAME;
		op.d = (void *)ftrace_regs_get_argument(fregs, 1);
		op.d2 = (void *)ftrace_regs_get_argument(fregs, 3);
		break;
	case TB_FH_LINK:
		op.op = TB_FOP_LINK;
		op.d = (void *)ftrace_regs_get_argument(fregs, 0);
		op.d2 = (void *)ftrace_regs_get_argument(fregs, 2);
		break;
	case TB_FH_SETATTR:
		ia = (const void *)ftrace_regs_get_argument(fregs, 2);
		/* O_TRUNC and ftruncate() truncate a file whose open for
		 * writing was decided. */
		if (!(ia->ia_valid & ATTR_SIZE) ||
		    (ia->ia_valid & (ATTR_OPEN | ATTR_FILE)))
			return;
		op.op = TB_FOP_TRUNCATE;
		op.d = (void *)ftrace_regs_get_argument(fregs, 1);
		break;
	}
	tb_file_decide(fregs, &op);
}

#define TB_FHOOK(fn, k, opt)						\
	{								\
		.ops = { .func = tb_file_hook,				\
			 .flags = FTRACE_OPS_FL_IPMODIFY |		\
				  FTRACE_OPS_FL_PERMANENT },		\
		.name = #fn, .kind = (k), .optional = (opt),		\
	}

static struct tb_fhook tb_fhooks[] = {
	TB_FHOOK(security_file_open, TB_FH_OPEN, false),
	/* open(O_CREAT) creates through i_op->create directly, after
	 * security_path_mknod(path, dentry, mode, dev). */
	TB_FHOOK(security_path_mknod, TB_FH_NEW1, true),
	TB_FHOOK(security_inode_create, TB_FH_NEW1, false),
	TB_FHOOK(security_inode_mkdir, TB_FH_NEW1, false),
	TB_FHOOK(security_inode_mknod, TB_FH_NEW1, false),
	TB_FHOOK(security_inode_symlink, TB_FH_NEW1, false),
	TB_FHOOK(security_inode_unlink, TB_FH_DELETE1, false),
	TB_FHOOK(security_inode_rmdir, TB_FH_RMDIR, false),
	TB_FHOOK(security_inode_rename, TB_FH_RENAME, false),
	TB_FHOOK(security_inode_link, TB_FH_LINK, false),
	TB_FHOOK(security_inode_setattr, TB_FH_SETATTR, false),
	TB_FHOOK(security_socket_create, TB_FH_SOCKET, false),
};

static_assert(ARRAY_SIZE(tb_fhooks) == ARRAY_SIZE(tb_fhook_on));

void tb_file_hooks_stop(void)
{
	int i;

	for (i = ARRAY_SIZE(tb_fhooks) - 1; i >= 0; i--) {
		if (tb_fhook_on[i])
			tb_unhook_one(&tb_fhooks[i].ops);
		tb_fhook_on[i] = false;
	}
	wait_event(tb_net_drained, !atomic_read(&tb_net_inflight));
}

int tb_file_hooks_start(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(tb_fhooks); i++) {
		err = tb_hook_one(&tb_fhooks[i].ops, tb_fhooks[i].name);
		if (err && tb_fhooks[i].optional) {
			pr_info("file gate: no %s (CONFIG_SECURITY_PATH off?): creates by open(O_CREAT) are decided at the open\n",
				tb_fhooks[i].name);
			continue;
		}
		if (err) {
			tb_file_hooks_stop();
			return err;
		}
		tb_fhook_on[i] = true;
	}
	return 0;
}
