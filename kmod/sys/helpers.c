// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers of trustbind.ko: the kernel structs, macros and static inlines
 * behind the flat functions declared in helpers.h.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <crypto/hash.h>
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
#include <linux/wait.h>
#include <linux/jiffies.h>
#include <linux/file.h>
#include <linux/rcupdate.h>
#include <linux/sched/mm.h>

#include "helpers.h"

/* --- Hashing ------------------------------------------------------------ */

struct tb_hashers {
	struct crypto_shash *sha256;
	struct crypto_shash *sha1;
};

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

int tb_bprm_info(const struct linux_binprm *bprm, struct tb_exec_info *out)
{
	struct file *file = bprm->file;
	struct inode *inode = file_inode(file);
	const struct cred *cred = current_cred();
	struct kstat stat;
	int err;

	memset(out, 0, sizeof(*out));
	err = vfs_getattr_nosec(&file->f_path, &stat, STATX_CHANGE_COOKIE,
				AT_STATX_SYNC_AS_STAT);
	if (err)
		return err;
	out->size = i_size_read(inode);
	out->dev = inode->i_sb->s_dev;
	out->ino = inode->i_ino;
	out->generation = inode->i_generation;
	if (stat.result_mask & STATX_CHANGE_COOKIE) {
		out->has_change_cookie = 1;
		out->change_cookie = stat.change_cookie;
	}
	out->uid = from_kuid(&init_user_ns, cred->uid);
	out->euid = from_kuid(&init_user_ns, cred->euid);
	out->gid = from_kgid(&init_user_ns, cred->gid);
	out->loginuid = from_kuid(&init_user_ns, audit_get_loginuid(current));
	out->sessionid = audit_get_sessionid(current);
	out->tgid = task_tgid_nr(current);
	out->start_ns = current->group_leader->start_boottime;
	rcu_read_lock();
	{
		struct task_struct *parent = rcu_dereference(current->real_parent);

		out->ptgid = task_tgid_nr(parent);
		out->pstart_ns = parent->group_leader->start_boottime;
	}
	rcu_read_unlock();
	return 0;
}

#define TB_HASH_CHUNK (32 * 1024)

int tb_hash_file(struct tb_hashers *h, const struct linux_binprm *bprm,
		 u8 *sha256_out, u8 *sha1_out)
{
	SHASH_DESC_ON_STACK(d256, h->sha256);
	SHASH_DESC_ON_STACK(d1, h->sha1);
	struct file *file = bprm->file;
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

int tb_current_exe_id(struct tb_file_id *out)
{
	struct mm_struct *mm = current->mm;
	struct inode *inode;
	struct kstat stat;
	struct file *f;
	int err;

	memset(out, 0, sizeof(*out));
	if (!mm)
		return -ENOENT;
	rcu_read_lock();
	f = get_file_rcu(&mm->exe_file);
	rcu_read_unlock();
	if (!f)
		return -ENOENT;
	err = vfs_getattr_nosec(&f->f_path, &stat, STATX_CHANGE_COOKIE,
				AT_STATX_SYNC_AS_STAT);
	if (!err) {
		inode = file_inode(f);
		out->dev = inode->i_sb->s_dev;
		out->ino = inode->i_ino;
		out->generation = inode->i_generation;
		if (stat.result_mask & STATX_CHANGE_COOKIE) {
			out->has_change_cookie = 1;
			out->change_cookie = stat.change_cookie;
		}
	}
	fput(f);
	return err;
}

u64 tb_now_ms(void)
{
	return jiffies64_to_msecs(get_jiffies_64());
}

void tb_set_nice_current(int nice)
{
	set_user_nice(current, nice);
}
